"""engines/: ONNX -> plan builds with TensorRT-RTX on CPU, the engine cache, the CLI, the manifest.

CPU tier: builds need only `tensorrt_rtx` (ahead-of-time, no GPU), a required test dependency (a
skip outside CI, a failure under CI=true; tests/conftest.py). Tests that deserialize or run a plan
are marked `gpu` (and `trt` for full TensorRT) and skip without that hardware.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import require

from engines import cache, trt_import
from engines.__main__ import main as cli
from engines.build import BuildConfig, build_engine, build_manifest
from engines.cache import EngineCacheError
from engines.manifest import SCHEMA, Manifest, ManifestError, check

onnx = require("onnx")

ROOT = Path(__file__).resolve().parents[1]
HAS_RTX = trt_import.available("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not importable: pip install tensorrt-rtx-cu13==1.7.1.116 "
                               "(or pip install -e .[test])")
PROFILE = {"x": ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 8))}
FAST = dict(flavour="tensorrt_rtx", opt_level=0, workspace_mib=64)  # quick builds for tests


class Tiny(torch.nn.Module):
    """conv + matmul + softmax: the op mix of a UNet block in miniature."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):  # x: (B, 4, 8, 8)
        y = self.conv(x).flatten(2).transpose(1, 2)  # (B, 64, 8)
        return torch.softmax(self.lin(y), dim=-1)  # (B, 64, 8)


def export(path: Path, dtype=torch.float16, seed=0) -> Path:
    """TorchScript exporter (dynamo=False): needs no onnxscript and takes ~0.3 s."""
    torch.manual_seed(seed)
    m = Tiny().eval().to(dtype)
    x = torch.randn(2, 4, 8, 8, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(m, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=18,
                          dynamo=False, dynamic_axes={"x": {0: "B"}, "y": {0: "B"}})
    return path


@pytest.fixture
def fp16_onnx(tmp_path):
    return export(tmp_path / "tiny.onnx")


# ---------------------------------------------------------------- hashing (no TensorRT)

def test_onnx_hash_covers_external_data(tmp_path):
    src = onnx.load(str(export(tmp_path / "a.onnx", torch.float32)))
    path = tmp_path / "ext" / "m.onnx"
    path.parent.mkdir()
    onnx.save_model(src, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    assert cache.external_data_files(path) == [path.parent / "m.data"]
    before, graph_before = cache.onnx_sha256(path), cache.sha256_file(path)
    data = bytearray((path.parent / "m.data").read_bytes())
    data[0] ^= 1  # a weight changes, the graph file does not
    (path.parent / "m.data").write_bytes(bytes(data))
    assert cache.sha256_file(path) == graph_before
    assert cache.onnx_sha256(path) != before
    (path.parent / "m.data").unlink()
    with pytest.raises(FileNotFoundError, match="m.data"):
        cache.onnx_sha256(path)


def test_key_digest_ignores_profile_order():
    a = cache.BuildKey("0" * 64, "tensorrt_rtx", "1", ["sm_89"], {"a": {}, "b": {}})
    b = cache.BuildKey("0" * 64, "tensorrt_rtx", "1", ["sm_89"], {"b": {}, "a": {}})
    assert a.digest() == b.digest() and not a.diff(b.to_dict())
    assert a.diff({**a.to_dict(), "targets": ["sm_86"]}) == ["targets"]


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "x.plan"
    cache.atomic_write(p, b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        cache.atomic_write(p, b"new")
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["x.plan"]  # no temp file left behind


# ---------------------------------------------------------------- builds (TensorRT-RTX on CPU)

@needs_rtx
@pytest.mark.parametrize("dtype,name", [(torch.float16, "float16"), (torch.float32, "float32")])
def test_build_precision_follows_graph(tmp_path, dtype, name):
    onnx_path = export(tmp_path / "m.onnx", dtype)
    r = build_engine(onnx_path, tmp_path / "m.plan", PROFILE, BuildConfig(**FAST))
    assert r.built and r.engine.stat().st_size > 0
    side = cache.read_sidecar(r.engine)
    assert {t["name"]: t["dtype"] for t in side["io"]} == {"x": name, "y": name}
    convs = [layer for layer in side["network_layers"] if layer["type"] == "CONVOLUTION"]
    assert convs and convs[0]["dtypes"] == [name]  # strongly typed: the graph's precision is kept
    assert side["key"]["builder"] == "tensorrt_rtx" and side["key"]["targets"] == ["rtx_default"]
    assert side["engine_layers"], "compiled layers should come from the RTX build log"
    assert name in {d for layer in side["engine_layers"] for d in layer["dtypes"]}


@needs_rtx
def test_cache_hit_then_rebuilds_on_change(tmp_path, fp16_onnx):
    plan, cfg = tmp_path / "tiny.plan", BuildConfig(**FAST)
    first = build_engine(fp16_onnx, plan, PROFILE, cfg)
    mtime = plan.stat().st_mtime_ns
    again = build_engine(fp16_onnx, plan, PROFILE, cfg)
    assert first.built and not again.built and again.reason == "cache hit"
    assert plan.stat().st_mtime_ns == mtime

    export(fp16_onnx, seed=1)  # same graph, new weights
    r = build_engine(fp16_onnx, plan, PROFILE, cfg)
    assert r.built and "onnx_sha256" in r.reason

    wider = {"x": ((1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 8, 8))}
    r = build_engine(fp16_onnx, plan, wider, cfg)
    assert r.built and "profile" in r.reason

    r = build_engine(fp16_onnx, plan, wider, BuildConfig(**FAST, targets=("sm_89",)))
    assert r.built and "targets" in r.reason and r.key.targets == ["sm_89"]


@needs_rtx
def test_corrupt_plan_is_rebuilt_or_refused(tmp_path, fp16_onnx):
    plan, cfg = tmp_path / "tiny.plan", BuildConfig(**FAST)
    build_engine(fp16_onnx, plan, PROFILE, cfg)
    plan.write_bytes(plan.read_bytes()[:1000])  # truncated, as by a crash or a bad copy
    with pytest.raises(EngineCacheError, match="corrupt"):
        build_engine(fp16_onnx, plan, PROFILE, BuildConfig(**FAST, rebuild="never"))
    r = build_engine(fp16_onnx, plan, PROFILE, cfg)
    assert r.built and "corrupt" in r.reason
    assert cache.check(plan, r.key) is None

    cache.sidecar_path(plan).write_text("{not json")
    r = build_engine(fp16_onnx, plan, PROFILE, cfg)
    assert r.built and "sidecar" in r.reason

    data = bytearray(plan.read_bytes())  # same size, other bytes: only the sha256 can tell
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(EngineCacheError, match="corrupt"):
        build_engine(fp16_onnx, plan, PROFILE, BuildConfig(**FAST, rebuild="never"))


def test_cache_check_compares_plan_bytes_not_just_size(tmp_path):
    """check() without TensorRT: a sidecar that matches in key and size but not in content is refused."""
    plan, key = tmp_path / "m.plan", cache.BuildKey("0" * 64, "tensorrt_rtx", "1", ["rtx_default"])
    plan.write_bytes(b"plan-bytes-A")
    cache.write_json(cache.sidecar_path(plan), {"key": key.to_dict(), "engine_bytes": 12,
                                                "engine_sha256": cache.sha256_file(plan)})
    assert cache.check(plan, key) is None
    plan.write_bytes(b"plan-bytes-B")
    assert "corrupt" in cache.check(plan, key)


@needs_rtx
def test_build_engine_hashes_external_data(tmp_path):
    """A weight change in the external-data file alone (graph file unchanged) invalidates the plan."""
    src = onnx.load(str(export(tmp_path / "a.onnx")))
    path = tmp_path / "ext" / "m.onnx"
    path.parent.mkdir()
    onnx.save_model(src, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    plan, cfg = tmp_path / "m.plan", BuildConfig(**FAST)
    assert build_engine(path, plan, PROFILE, cfg).built
    graph = cache.sha256_file(path)
    data = bytearray((path.parent / "m.data").read_bytes())
    data[-1] ^= 1
    (path.parent / "m.data").write_bytes(bytes(data))
    assert cache.sha256_file(path) == graph
    with pytest.raises(EngineCacheError, match="onnx_sha256"):
        build_engine(path, plan, PROFILE, BuildConfig(**FAST, rebuild="never"))


@needs_rtx
def test_plan_is_written_before_sidecar(tmp_path, fp16_onnx, monkeypatch):
    """Plan first, sidecar last: a crash between the two leaves a pair that check() refuses."""
    plan, cfg = tmp_path / "tiny.plan", BuildConfig(**FAST)
    writes, atomic_write = [], cache.atomic_write
    monkeypatch.setattr(cache, "atomic_write", lambda p, d: writes.append(Path(p).name) or atomic_write(p, d))
    build_engine(fp16_onnx, plan, PROFILE, cfg)
    assert writes == ["tiny.plan", "tiny.plan.json"]

    def crash(path, obj):
        raise OSError("killed before the sidecar")
    monkeypatch.setattr(cache, "write_json", crash)
    export(fp16_onnx, seed=1)  # new weights: a rebuild that dies after writing the plan
    with pytest.raises(OSError, match="killed"):
        build_engine(fp16_onnx, plan, PROFILE, cfg)
    monkeypatch.undo()
    export(fp16_onnx, seed=0)  # even with the old ONNX back, the old sidecar no longer matches the plan
    with pytest.raises(EngineCacheError, match="corrupt"):
        build_engine(fp16_onnx, plan, PROFILE, BuildConfig(**FAST, rebuild="never"))


@needs_rtx
def test_profile_errors_name_the_input(tmp_path, fp16_onnx):
    cfg = BuildConfig(**FAST)
    with pytest.raises(ValueError, match=r"dynamic input\(s\) \['x'\]"):
        build_engine(fp16_onnx, tmp_path / "a.plan", None, cfg)
    with pytest.raises(ValueError, match="static"):
        build_engine(fp16_onnx, tmp_path / "a.plan", {"x": ((1, 3, 8, 8),) * 3}, cfg)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        build_engine(fp16_onnx, tmp_path / "a.plan", {"x": ((4, 4, 8, 8), (2, 4, 8, 8), (8, 4, 8, 8))}, cfg)
    with pytest.raises(ValueError, match="unknown RTX target"):
        build_engine(fp16_onnx, tmp_path / "a.plan", PROFILE, BuildConfig(**FAST, targets=("sm_90",)))
    assert not (tmp_path / "a.plan").exists()


@needs_rtx
def test_rtx_writes_no_timing_cache(tmp_path, fp16_onnx):
    r = build_engine(fp16_onnx, tmp_path / "tiny.plan", PROFILE, BuildConfig(**FAST))
    assert r.timing_cache is None and not list(tmp_path.glob("timing-*"))


@pytest.mark.gpu
@pytest.mark.trt
def test_timing_cache_reused(tmp_path, fp16_onnx):
    cfg = BuildConfig(flavour="tensorrt", opt_level=0, workspace_mib=64)
    first = build_engine(fp16_onnx, tmp_path / "a.plan", PROFILE, cfg)
    second = build_engine(export(tmp_path / "b.onnx", seed=1), tmp_path / "b.plan", PROFILE, cfg)
    assert first.timing_cache == "new" and second.timing_cache == "loaded"
    assert len(list(tmp_path.glob("timing-tensorrt-*.cache"))) == 1


# ---------------------------------------------------------------- CLI

@needs_rtx
def test_cli_build_and_inspect(tmp_path, fp16_onnx, capsys):
    shape = "x:1x4x8x8,2x4x8x8,4x4x8x8"
    args = ["build", str(fp16_onnx), "--shape", shape, "--trt", "tensorrt_rtx", "--opt-level", "0",
            "--workspace-mib", "64", "--out", str(tmp_path / "out")]
    assert cli(args) == 0
    plan = tmp_path / "out" / "tiny.plan"
    assert plan.stat().st_size > 0 and "built" in capsys.readouterr().out
    assert cli(args) == 0 and "cached" in capsys.readouterr().out

    assert cli(["inspect", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "input  x" in out and "output y" in out and "float16" in out
    assert "max (4, 4, 8, 8)" in out and "layers" in out
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in out and "build log" in out

    assert cli(["inspect", str(plan), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in report["io"]} == {"x", "y"} and report["layers"]


@needs_rtx
def test_cli_errors_are_one_line(tmp_path, fp16_onnx, capsys):
    assert cli(["build", str(fp16_onnx), "--trt", "tensorrt_rtx"]) == 1
    assert "need a min/opt/max profile" in capsys.readouterr().err
    assert cli(["inspect", str(tmp_path / "nope.plan")]) == 1
    assert "no such engine" in capsys.readouterr().err


@needs_rtx
def test_python_m_engines_entry_point(tmp_path, fp16_onnx):
    plan = tmp_path / "tiny.plan"
    build_engine(fp16_onnx, plan, PROFILE, BuildConfig(**FAST))
    p = subprocess.run([sys.executable, "-m", "engines", "inspect", str(plan)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "input  x" in p.stdout


# ---------------------------------------------------------------- manifest

def manifest_dict(onnx_sha="0" * 64) -> dict:
    return {
        "schema": SCHEMA,
        "preset": {"name": "tiny"},
        "sampler": {"timesteps": [999, 499], "coefficients": {"alpha_prod_t_sqrt": [0.07, 0.5]}},
        "caches": {"reference_kv": {"layers": 2, "layout": "B,heads,tokens,dim"}},
        "engines": [{
            "name": "tiny", "runs": "per_frame_step",
            "onnx": {"file": "tiny.onnx", "sha256": onnx_sha},
            "inputs": [{"name": "x", "shape": ["B", 4, 8, 8], "dtype": "float16"}],
            "outputs": [{"name": "y", "shape": ["B", 64, 8], "dtype": "float16"}],
            "profile": {"x": {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 8, 8]}},
        }],
    }


def test_manifest_round_trip(tmp_path):
    m = Manifest.from_dict(manifest_dict())
    assert m.engine("tiny").inputs[0].shape == ["B", 4, 8, 8]
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    m.save(tmp_path / "manifest.json")
    assert Manifest.load(tmp_path / "manifest.json") == m
    with pytest.raises(KeyError, match="no engine 'vae'"):
        m.engine("vae")


def _mutate(path: str, value):
    d = manifest_dict()
    *head, last = path.split(".")
    node = d
    for k in head:
        node = node[int(k)] if k.isdigit() else node[k]
    if value is KeyError:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return d


@pytest.mark.parametrize("path,value,message", [
    ("schema", "xportrait-engines/0", "schema: 'xportrait-engines/0'"),
    ("engines.0.runs", "per_batch", "engines[0].runs: 'per_batch'; use one of per_source"),
    ("engines.0.inputs.0.dtype", "fp16", "engines[0].inputs[0].dtype: 'fp16' is not supported"),
    ("engines.0.inputs.0.shape", [-1, 4, 8, 8], "engines[0].inputs[0].shape"),
    ("engines.0.profile", {}, "input 'x' has dynamic dims ['B'] but no profile"),
    ("engines.0.profile.x.min", [1, 3, 8, 8], "dim 1 is static (4)"),
    ("engines.0.onnx.sha256", "abc", "engines[0].onnx.sha256: expected 64 lowercase hex"),
    ("engines.0.onnx.file", "../tiny.onnx", "relative to the manifest folder"),
    ("engines.0.engine", {"file": "tiny.plan", "sha256": "0" * 64}, "'engine' and 'build' go together"),
    ("engines.0.outputs", [], "engines[0].outputs: expected a non-empty list"),
    ("engines.0.color", "red", "engines[0].color: unknown field"),
    ("engines.0.name", KeyError, "engines[0].name: missing"),
    ("sampler.coefficients.alpha_prod_t_sqrt", [0.1], "sampler.coefficients.alpha_prod_t_sqrt: expected 2 numbers"),
    ("caches.reference_kv", [1, 2], "caches: expected {name: {...}}"),
    ("engines", [], "engines: expected a non-empty list"),
])
def test_manifest_errors_name_field_and_fix(path, value, message):
    d = _mutate(path, value)
    assert any(message in e for e in check(d)), check(d)
    with pytest.raises(ManifestError, match="problem"):
        Manifest.from_dict(d)


def test_manifest_duplicate_names_and_bad_json(tmp_path):
    d = manifest_dict()
    d["engines"].append(d["engines"][0])
    assert any("used more than once" in e for e in check(d))
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path / "manifest.json")


@needs_rtx
def test_build_manifest_fills_engines(tmp_path):
    export(tmp_path / "tiny.onnx")
    d = manifest_dict(cache.onnx_sha256(tmp_path / "tiny.onnx"))
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    [r] = build_manifest(tmp_path, BuildConfig(**FAST))
    m = Manifest.load(tmp_path / "manifest.json")
    e = m.engine("tiny")
    assert r.built and e.engine.file == "tiny.plan" and e.engine.sha256 == cache.sha256_file(tmp_path / "tiny.plan")
    assert e.build.builder == "tensorrt_rtx" and e.build.key_digest == r.key.digest()
    assert m.sampler == d["sampler"] and m.caches == d["caches"]  # exporter sections kept
    [again] = build_manifest(tmp_path, BuildConfig(**FAST))
    assert not again.built

    export(tmp_path / "tiny.onnx", seed=1)  # changed after export: the manifest hash is stale
    with pytest.raises(ManifestError, match="changed since export"):
        build_manifest(tmp_path, BuildConfig(**FAST))
    with pytest.raises(ManifestError, match="not in the manifest"):
        build_manifest(tmp_path, BuildConfig(**FAST), only=["vae"])


@needs_rtx
def test_build_manifest_checks_io_against_graph(tmp_path):
    export(tmp_path / "tiny.onnx")
    d = manifest_dict(cache.onnx_sha256(tmp_path / "tiny.onnx"))
    d["engines"][0]["outputs"][0]["name"] = "latent"
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="re-export so the manifest matches"):
        build_manifest(tmp_path, BuildConfig(**FAST))


# ---------------------------------------------------------------- GPU runtime

def test_engine_needs_gpu(tmp_path, monkeypatch):
    from engines.engine import Engine, EngineError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineError, match="needs a CUDA GPU"):
        Engine(tmp_path / "x.plan")


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    flavour = trt_import.available()
    if flavour is None:
        return "needs tensorrt or tensorrt_rtx"
    if flavour == "tensorrt_rtx" and torch.cuda.get_device_capability()[0] in (9, 10):
        return "tensorrt_rtx plans do not run on data-center GPUs (Hopper/Blackwell B200); install tensorrt"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))
@pytest.mark.parametrize("use_cuda_graph", [False, True])
def test_engine_runs_reshapes_and_shares_scratch(tmp_path, fp16_onnx, use_cuda_graph):
    from engines.engine import Engine, EngineError, shared_scratch

    plan = build_engine(fp16_onnx, tmp_path / "tiny.plan", PROFILE, BuildConfig(opt_level=0, workspace_mib=256)).engine
    torch.manual_seed(0)
    module = Tiny().eval().half().cuda()
    module.load_state_dict({k: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for k, t in
                            ((i.name, i) for i in onnx.load(str(fp16_onnx)).graph.initializer)
                            if k in dict(module.named_parameters())}, strict=False)
    a, b = Engine(plan, use_cuda_graph=use_cuda_graph), Engine(plan)
    scratch = shared_scratch([a, b])
    assert scratch.numel() >= a.device_memory_size
    stream = torch.cuda.Stream()
    for batch in (2, 3, 3):  # a shape change reallocates outputs (and recaptures the graph)
        x = torch.randn(batch, 4, 8, 8, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            ref = module(x)
        y = a.infer({"x": x}, stream)["y"]
        torch.cuda.current_stream().wait_stream(stream)
        assert y.shape == ref.shape and (y.float() - ref.float()).abs().max() < 2e-3
    with pytest.raises(EngineError, match="outside the engine profile"):
        a.infer({"x": torch.zeros(9, 4, 8, 8, device="cuda", dtype=torch.float16)})
    with pytest.raises(EngineError, match="engine wants torch.float16"):
        a.infer({"x": torch.zeros(2, 4, 8, 8, device="cuda")})
