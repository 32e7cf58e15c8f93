"""ONNX export (export/): every graph of the tiny preset under ONNX Runtime (CPU) vs PyTorch.

One module-scoped export of all 11 graphs in fp32 and fp16 (16x16 latent, T = 2, L = 3 ring slots),
with the golden set's weights and context when it is present (realistic activations) and seeded
random weights otherwise. TAESD weights are random, saved to files so the loader path runs too.

Bounds (max |ort - torch_fp32| / max |torch_fp32| over every output of a graph):
- fp32: 1e-4 (the issue's bound; measured <= 3.3e-6 for every graph).
- fp16: 3e-2. Measured on 2026-11-21 with the golden weights (ORT 1.31 CPU, which computes fp16
  nodes in fp32 and rounds every intermediate to fp16, like fp16 storage with fp32 accumulation):
  hint 8.9e-4, TAESD 1.0e-3 / 1.1e-3, unet 2.4e-3, control 2.8e-3, unet_uncond 3.0e-3, unet_stream
  3.9e-3, reference 4.5e-3, unet_stream_uncond 9.0e-3 (random weights: at most 2.7e-3). The worst
  case is k_new_16 (rms error 5.4e-3, so not an outlier): the motion module after the lowest-level
  ResBlock, where at a 16x16 latent tiny's GroupNorm normalises groups of 4 values and amplifies the
  fp16 rounding of its input (sd15 groups hold 2560). 3e-2 keeps a 3.3x margin over it, while wrong
  wiring (a dropped input or residual, a wrong cache slot or position) is off by 1e-1 or more.
  The KL VAE graphs stay fp32 in the fp16 set, so they meet the fp32 bound there.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from export.__main__ import export_all, main  # noqa: E402
from export.spec import ExportOptions  # noqa: E402
from export.specs import ModelSource, build_specs  # noqa: E402
from export.to_onnx import Graph, infer_shapes, save, to_fp16  # noqa: E402
from models.config import XPortraitConfig  # noqa: E402
from models.streaming import StreamingUNet, alloc_ring, ring_advance, ring_write  # noqa: E402

OPTS = ExportOptions(latent_hw=(16, 16), window=2, slots=3)
ALL = ("vae_encoder", "taesd_encoder", "reference", "hint", "control", "unet", "unet_uncond", "unet_stream",
       "unet_stream_uncond", "taesd_decoder", "vae_decoder")
BOUND = {"fp32": 1e-4, "fp16": 3e-2}


def rel(got: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.detach().float().numpy()
    return float(np.abs(got.astype(np.float32) - ref).max() / np.abs(ref).max())


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def session(path: str) -> "ort.InferenceSession":
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT warns that it cannot constant-fold some fp16 nodes on the CPU
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # test the graph as exported
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def run_ort(path, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    s = session(str(path))
    want = {i.name: i.type for i in s.get_inputs()}
    arrays = {k: v.numpy().astype(np.float16) if want[k] == "tensor(float16)" else v.numpy() for k, v in feed.items()}
    return s.run(None, arrays)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Export/ModelSource keyword arguments: golden checkpoint + context if present, TAESD files."""
    from safetensors.torch import save_file

    from conftest import GOLDEN
    from models.init import init_random_
    from models.taesd import TAESD
    d = tmp_path_factory.mktemp("taesd")
    taesd = init_random_(TAESD(XPortraitConfig.from_name("tiny").taesd), seed=5)
    save_file(taesd.encoder.state_dict(), str(d / "taesd_encoder.safetensors"))
    save_file(taesd.decoder.state_dict(), str(d / "taesd_decoder.safetensors"))
    if (GOLDEN / "state.safetensors").is_file():
        return dict(checkpoint=GOLDEN / "state.safetensors", context=GOLDEN / "io.safetensors", taesd=d)
    return dict(taesd=None)  # random weights (TAESD included)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, weights):
    out = tmp_path_factory.mktemp("onnx")
    logs: list[str] = []
    folders = export_all("tiny", out, ("fp32", "fp16"), ALL, OPTS, log=logs.append, **weights)
    return folders, logs


@pytest.fixture(scope="module")
def source(weights):
    return ModelSource(XPortraitConfig.from_name("tiny"), **weights)


@pytest.fixture(scope="module")
def specs():
    return build_specs(XPortraitConfig.from_name("tiny"))


@pytest.mark.parametrize("name", ALL)
def test_graph_matches_torch(exported, source, specs, name):
    """fp32 and fp16 ONNX graphs vs the fp32 torch module, on the spec's sample inputs."""
    folders, _ = exported
    spec = specs[name]
    feed = spec.sample_inputs(OPTS, seed=1)
    with torch.no_grad():
        ref = spec.build(source, OPTS)(*(feed[t.name] for t in spec.inputs))
    for prec, folder in folders.items():
        got = run_ort(folder / f"{name}.onnx", feed)
        errs = [rel(g, r) for g, r in zip(got, ref)]
        worst = int(np.argmax(errs))
        print(f"{name} {prec}: max rel err {errs[worst]:.2e} ({spec.outputs[worst].name})")
        bound = BOUND["fp32" if name.startswith("vae_") else prec]  # the KL VAE graphs stay fp32 in the fp16 set
        assert len(got) == len(spec.outputs)
        assert errs[worst] <= bound, f"{name} {prec}: {spec.outputs[worst].name} off by {errs[worst]:.2e}"


def test_manifest_describes_graphs(exported, specs):
    from engines.cache import onnx_sha256
    from engines.manifest import Manifest
    folders, logs = exported
    assert any("unet_stream" in line for line in logs) and "peak RSS" in logs[-1]
    for prec, folder in folders.items():
        m = Manifest.load(folder / "manifest.json")
        assert [e.name for e in m.engines] == [n for n in specs if n in ALL]
        for e in m.engines:
            assert e.onnx.sha256 == onnx_sha256(folder / e.onnx.file)
            assert [t.name for t in e.inputs] == [t.name for t in specs[e.name].inputs]
            assert e.profile == {}  # static export
        unet = {t.name: t for t in m.engine("unet_stream").inputs}
        assert unet["t"].dtype == "float32" and unet["write_slot"].dtype == "int32"
        assert unet["x"].dtype == ("float16" if prec == "fp16" else "float32")
        assert unet["k_cache_00"].shape == [3, 256, 32]  # (L, B*h*w, C) at the first motion module
        assert m.engine("vae_encoder").inputs[0].dtype == "float32"  # the KL VAE stays fp32
        assert len(m.sampler["timesteps"]) == 31 and "alphas" in m.sampler["coefficients"]
        assert m.caches["temporal_kv"]["layers"] == 40 and m.caches["temporal_kv"]["slots"] == 3
        assert len(m.caches["reference_kv"]["tensors"]) == 32
        assert (folder / "context.safetensors").is_file()


def test_fp16_keeps_fp32_islands(exported):
    """LayerNorm/GroupNorm statistics and the timestep phase stay fp32 in the fp16 graph."""
    folders, _ = exported
    g = onnx.load(str(folders["fp16"] / "unet.onnx")).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    islands = [n for n in g.node if n.op_type in ("LayerNormalization", "InstanceNormalization", "Sin", "Cos")]
    assert islands and all(types[n.input[0]] == f32 and types[n.output[0]] == f32 for n in islands)
    assert sum(types.get(n.output[0]) == f16 for n in g.node if n.op_type == "MatMul") > 0
    assert all(types.get(n.output[0]) == f16 for n in g.node if n.op_type in ("Conv", "Softmax"))


def test_timestep_phase_needs_fp32():
    """The converter rule that matters at t = 999: sin(t * f) with an fp16 phase is off by ~0.2."""
    from onnx import TensorProto, helper, numpy_helper
    f = np.exp(-np.log(10000.0) * np.arange(16) / 16).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Unsqueeze", ["t", "axes"], ["t1"]), helper.make_node("Mul", ["t1", "f"], ["ph"]),
         helper.make_node("Sin", ["ph"], ["s"]), helper.make_node("Add", ["s", "x"], ["y"])], "phase",
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(f, "f"), numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    infer_shapes(model)
    to_fp16(Graph(model))
    t = np.array([999.0], np.float32)
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert s.get_inputs()[0].type == "tensor(float)" and s.get_inputs()[1].type == "tensor(float16)"
    y = s.run(None, {"t": t, "x": np.zeros((1, 16), np.float16)})[0]
    exact = np.sin(t[:, None] * f)
    naive = np.sin((t[:, None].astype(np.float16) * f.astype(np.float16)).astype(np.float32))
    assert np.abs(y - exact).max() < 2e-3  # fp16 output rounding only
    assert np.abs(naive - exact).max() > 5e-2  # what the island prevents


def test_stream_host_ring_protocol(exported, source, specs):
    """ORT unet_stream frame by frame, with the ring kept by the host as the manifest says, equals the
    torch StreamingUNet; 4 frames through L = 3 slots wrap the ring."""
    folders, _ = exported
    spec, L = specs["unet_stream"], OPTS.slots
    base = spec.sample_inputs(OPTS, seed=2)
    unet = source.get("unet")
    kc, vc = alloc_ring(unet, L, 1, *OPTS.latent_hw)
    ws, n_past = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    host = {n: np.zeros(tuple(v.shape), np.float32) for n, v in base.items() if "_cache_" in n}
    ref_kv = [(base[f"ref_k_{i:02d}"], base[f"ref_v_{i:02d}"]) for i in range(16)]
    ctrl = [base[f"ctrl_{i:02d}"] for i in range(13)]
    g = torch.Generator().manual_seed(3)
    for frame in range(4):
        x = torch.randn(1, 4, *OPTS.latent_hw, generator=g)
        with torch.no_grad():
            eps, kn, vn = StreamingUNet(unet)(x, base["t"], base["context"], ref_kv, ctrl, kc, vc, ws, n_past)
        feed = {**base, "x": x, "write_slot": ws.clone(), "n_past": n_past.clone(),
                **{n: torch.from_numpy(a) for n, a in host.items()}}
        out = dict(zip([t.name for t in spec.outputs], run_ort(folders["fp32"] / "unet_stream.onnx", feed)))
        assert rel(out["eps"], eps[0:1]) < 1e-4, frame
        slot = int(ws)
        for i in range(40):  # after_call: new K/V into slot write_slot
            host[f"k_cache_{i:02d}"][slot] = out[f"k_new_{i:02d}"]
            host[f"v_cache_{i:02d}"][slot] = out[f"v_new_{i:02d}"]
        ring_write(kc, vc, kn, vn, ws)
        ring_advance(ws, n_past, L)  # after_frame
    assert int(ws) == 4 % L and int(n_past) == L - 1


def test_dynamic_shapes(tmp_path, weights, source, specs):
    """--dynamic: one graph serves other batch sizes and resolutions; profiles are in the manifest."""
    from engines.manifest import Manifest
    opts = ExportOptions(latent_hw=(16, 16), window=2, slots=3, dynamic=True)
    # the graph with the most derived dims (ring rows B*h*w/ds^2, per-element ref K/V and counters);
    # at B = 2 the sample counters and ref K/V differ per element (export/specs.py)
    name = "unet_stream"
    folder = export_all("tiny", tmp_path, ("fp32",), (name,), opts, log=lambda s: None, **weights)["fp32"]
    e = Manifest.load(folder / "manifest.json").engine(name)
    assert e.profile["x"] == {"min": [1, 4, 8, 8], "opt": [1, 4, 16, 16], "max": [4, 4, 24, 24]}
    assert e.profile["k_cache_04"] == {"min": [3, 16, 64], "opt": [3, 64, 64], "max": [3, 576, 64]}
    shapes = {t.name: t.shape for t in e.inputs}
    assert shapes["k_cache_00"] == [3, "B*h*w", 32] and shapes["write_slot"] == ["B"]
    assert shapes["ref_k_00"][0] == "B"
    for other in (ExportOptions(latent_hw=(24, 16), batch=2, window=2, slots=3), opts):
        feed = specs[name].sample_inputs(other, seed=4)
        with torch.no_grad():
            ref = specs[name].build(source, other)(*(feed[t.name] for t in specs[name].inputs))
        got = run_ort(folder / f"{name}.onnx", feed)
        assert max(rel(a, b) for a, b in zip(got, ref)) <= BOUND["fp32"], other.latent_hw


def test_external_data(tmp_path, exported):
    """Graphs past the size limit get one NAME.onnx.data file, which ORT and the hash both follow."""
    from engines.cache import onnx_sha256
    folders, _ = exported
    files = save(Graph.load(folders["fp32"] / "hint.onnx"), tmp_path / "hint.onnx", external_bytes=0)
    assert [f.name for f in files] == ["hint.onnx", "hint.onnx.data"]
    assert files[1].stat().st_size > 10 * files[0].stat().st_size
    feed = build_specs(XPortraitConfig.from_name("tiny"))["hint"].sample_inputs(OPTS)
    a, b = run_ort(files[0], feed), run_ort(folders["fp32"] / "hint.onnx", feed)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    digest = onnx_sha256(files[0])
    # the sd15 path in small: fp16 conversion of external weights is deferred and streamed by save()
    graph = Graph.load(files[0])
    to_fp16(graph)
    assert graph.pending and all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.model.graph.initializer
                                 if t.name in graph.pending)
    out = save(graph, tmp_path / "fp16" / "hint.onnx", external_bytes=0)
    c = run_ort(out[0], feed)
    d = run_ort(folders["fp16"] / "hint.onnx", feed)
    assert all(np.array_equal(x, y) for x, y in zip(c, d))
    files[1].write_bytes(files[1].read_bytes()[:-4] + b"\0\0\0\0")
    assert onnx_sha256(files[0]) != digest


def test_exported_graphs_reproduce_golden(exported, weights):
    """The fp32 graphs chained under ORT (vae_encoder -> reference; hint -> control -> unet) give the
    official model's eps_cond / eps_uncond of the golden set."""
    if "checkpoint" not in weights:
        pytest.skip("golden set not present")
    from safetensors.torch import load_file

    from conftest import GOLDEN
    io = load_file(str(GOLDEN / "io.safetensors"))
    d = exported[0]["fp32"]
    t, ctx = io["timesteps"], io["context"][:1]
    latent = run_ort(d / "vae_encoder.onnx", {"image": io["source_image"]})[0]
    assert rel(latent, io["ref_latent"][:1]) < 1e-4
    ref = run_ort(d / "reference.onnx", {"ref_latent": torch.from_numpy(latent), "t": t[:1], "context": ctx})
    ref_names = [f"ref_{kv}_{i:02d}" for i in range(16) for kv in "kv"]
    ctrl = []
    for f in range(2):  # the static per-frame graphs run at B = 1
        f1 = slice(f, f + 1)
        pose, local = run_ort(d / "hint.onnx", {"pose_hint": io["pose_hint"][f1], "local_hint": io["local_hint"][f1]})
        ctrl.append(run_ort(d / "control.onnx", {"x": io["x_noisy"][f1], "t": t[f1], "context": ctx,
                                                 "pose_feat": torch.from_numpy(pose),
                                                 "local_feat": torch.from_numpy(local)}))
    feed = {"x": io["x_noisy"], "t": t, "context": ctx, **{n: torch.from_numpy(a) for n, a in zip(ref_names, ref)},
            **{f"ctrl_{i:02d}": torch.from_numpy(np.concatenate([c[i] for c in ctrl])) for i in range(13)}}
    assert rel(run_ort(d / "unet.onnx", feed)[0], io["eps_cond"]) < 1e-4
    uncond = run_ort(d / "unet_uncond.onnx", {"x": io["x_noisy"], "t": t, "context": ctx})[0]
    assert rel(uncond, io["eps_uncond"]) < 1e-4


def test_sampler_table():
    from export.__main__ import sampler_table
    lcm = sampler_table(XPortraitConfig.from_name("tiny"), "lcm", 4)
    assert lcm["timesteps"] == [999, 759, 499, 259]
    assert {"c_skip", "c_out"} <= set(lcm["coefficients"]) and all(len(v) == 4 for v in lcm["coefficients"].values())


def test_cli_errors(tmp_path, capsys, weights):
    assert main(["--preset", "tiny", "--out", str(tmp_path), "--modules", "nope"]) == 1
    assert "unknown module" in capsys.readouterr().err
    if "checkpoint" in weights:  # a real checkpoint without TAESD weights cannot give TAESD graphs
        assert main(["--preset", "tiny", "--out", str(tmp_path), "--latent", "16", "--window", "2",
                     "--checkpoint", str(weights["checkpoint"]), "--context", str(weights["context"]),
                     "--modules", "taesd_decoder"]) == 1
        assert "--taesd" in capsys.readouterr().err


def test_every_graph_builds_with_tensorrt_rtx(exported, capsys):
    """CI's TensorRT step: every fp16 graph of the tiny preset becomes an engine (TensorRT-RTX builds
    ahead of time on the CPU), recorded in the manifest; the UNet plan holds fp16 layers."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is a test extra: pip install -e .[test]")
    from engines.__main__ import main as engines_main
    from engines.build import BuildConfig, build_manifest
    from engines.manifest import Manifest
    folder = exported[0]["fp16"]
    results = build_manifest(folder, BuildConfig(flavour="tensorrt_rtx", opt_level=0, workspace_mib=1024))
    assert sorted(r.engine.stem for r in results) == sorted(ALL)
    assert all(r.engine.stat().st_size > 0 for r in results)
    m = Manifest.load(folder / "manifest.json")
    assert all(e.engine is not None and e.build is not None for e in m.engines)
    capsys.readouterr()
    assert engines_main(["inspect", str(folder / "unet.plan")]) == 0
    report = capsys.readouterr().out
    assert all(name in report for name in ("ref_k_15", "ctrl_12", "context", "eps")), report[:2000]
    assert "FP16" in report.upper() or "HALF" in report.upper(), report[:2000]
