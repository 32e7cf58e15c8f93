"""bench/: the latency benchmark and the GPU check, on the CPU with the tiny preset (no timing assertions).

* the benchmark's CPU smoke run (2 configurations, 3 frames, warm-up 1): JSON schema, every stage present,
  numbers finite and positive, FLOPs > 0 and equal to an independent count (forward hooks on the hint
  encoders' convolutions, no FlopCounterMode), the CSVs, the PNG chart, the closing table;
* the GPU check's dry run: GPU steps say "skipped: no CUDA", the latency step runs, at most 8 files;
* configuration parsing, the device peak table and the custom-op FLOP formulas.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
SESSION_STAGES = {"convert", "hint", "control", "unet", "decode"}
CONFIGS = ["name=seq-s1,steps=1,window=2", "name=sb-s2,steps=2,window=2,stream_batch=on"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, one_thread):
    """One CPU run of python -m bench.latency (in-process), shared by the checks below."""
    from bench import latency
    out = tmp_path_factory.mktemp("bench")
    argv = ["--preset", "tiny", "--frames", "3", "--warmup", "1", "--baseline-window", "1", "--baseline-evals", "1",
            "--out", str(out)]
    for c in CONFIGS:
        argv += ["--config", c]
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = latency.main(argv)
    return out, code, buf.getvalue()


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_latency_json_schema_and_stages(bench_run):
    out, code, _ = bench_run
    assert code == 0
    result = json.loads((out / "latency.json").read_text())
    assert result["schema"] == "xportrait-bench-latency/1"
    assert result["env"]["peak"]["peak"].startswith("n/a")
    assert [c["name"] for c in result["configs"]] == ["seq-s1", "sb-s2"]
    for c in result["configs"]:
        assert c["status"] == "ok", c["status"]
        stages = c["stages"]
        want = SESSION_STAGES | ({"sampler"} if not c["config"]["stream_batch"] else set())
        assert want <= set(stages), (c["name"], sorted(stages))
        for name, d in stages.items():
            assert all(_finite_positive(d[q]) for q in ("p50", "p90", "p99", "mean")), (name, d)
            assert d["p50"] <= d["p90"] <= d["p99"] and d["n"] == 3
        assert all(_finite_positive(c["frame_ms"][q]) for q in ("p50", "p90", "p99"))
        assert len(c["frame_series"]) == 3 and _finite_positive(c["fps_device"])
        pipe = c["pipeline"]
        assert pipe["frames_presented"] == 3 and not pipe["timed_out"]
        assert {"track", "upload", "download"} <= set(pipe["stages"]) and SESSION_STAGES <= set(pipe["stages"])
        assert all(_finite_positive(pipe["latency_ms"][q]) for q in ("p50", "p90", "p99"))
        assert _finite_positive(pipe["fps_sustained"]) and len(pipe["series"]) == 3
        assert c["memory"]["session"]["total"] > 0 and c["memory"]["session"]["rings"] > 0
        assert c["peak_share"] is None  # CPU: n/a
        assert _finite_positive(c["speedup_vs_baseline"])
    base = result["baseline"]
    assert base["status"] == "ok" and base["evals_scaled_to"] == 31 and "scaled" in base["method"]
    assert _finite_positive(base["frame_ms"]) and _finite_positive(base["flops_per_frame"])


def _hint_conv_flops(size: int) -> int:
    """Independent count: 2 x MACs of every Conv2d in both hint encoders, from output shapes (hooks)."""
    from models.config import XPortraitConfig
    from models.xportrait import XPortrait
    model = XPortrait(XPortraitConfig.from_name("tiny"))
    total = 0

    def hook(m, inp, out):
        nonlocal total
        total += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    encoders = [model.pose_control_model.input_hint_block, model.local_pose_control_model.input_hint_block]
    for enc in encoders:
        assert not any(isinstance(m, (torch.nn.Linear, torch.nn.MultiheadAttention)) for m in enc.modules())
        for m in enc.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(hook)
    with torch.no_grad():
        model.hint_features(torch.zeros(1, 3, size, size), torch.zeros(1, 3, size, size))
    return total


def test_flops_counted_and_match_an_independent_count(bench_run):
    out, _, _ = bench_run
    result = json.loads((out / "latency.json").read_text())
    seq, sb = result["configs"]
    for c in (seq, sb):
        per = c["flops"]["per_frame"]
        assert all(per[s] > 0 for s in ("hint", "control", "unet", "decode")), per
        assert c["flops"]["total_per_frame"] == sum(per.values()) and c["flops"]["per_source"] > 0
        assert c["stages"]["hint"]["flops"] == per["hint"] and _finite_positive(c["tflops"])
    assert seq["flops"]["per_frame"]["hint"] == _hint_conv_flops(128)
    # the stream batch runs 2 steps of 2 frames per call: twice the per-step work of one 1-step frame
    assert sb["flops"]["per_frame"]["control"] == 2 * seq["flops"]["per_frame"]["control"]


def test_csv_chart_and_table(bench_run):
    out, _, printed = bench_run
    from bench.report import CONFIG_COLUMNS, STAGE_COLUMNS
    with open(out / "configs.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CONFIG_COLUMNS and [r["config"] for r in rows] == ["seq-s1", "sb-s2"]
    assert all(float(r["frame_ms_p50"]) > 0 and float(r["gflop_per_frame"]) > 0 for r in rows)
    with open(out / "stages.csv") as f:
        stages = list(csv.DictReader(f))
    assert list(stages[0]) == STAGE_COLUMNS
    for name in ("seq-s1", "sb-s2"):
        assert SESSION_STAGES <= {r["stage"] for r in stages if r["config"] == name and r["source"] == "session"}
        assert "track" in {r["stage"] for r in stages if r["config"] == name and r["source"] == "pipeline"}
    assert (out / "latency.png").read_bytes()[:8] == PNG
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries
    last = printed.strip().splitlines()
    assert any("seq-s1" in line for line in last) and any("baseline" in line for line in last)


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out), "--budget", "400"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    for step in ("golden", "kernels", "pytest_gpu"):
        assert status[step] == "skipped: no CUDA", status
    assert status["env"] == "ok" and status["latency"] == "ok", status
    assert status["trt_rtx"].startswith("skipped")
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.json", "logs.txt", "latency.json", "latency.png"} <= set(files), files
    assert json.loads((out / "latency.json").read_text())["configs"][0]["status"] == "ok"
    assert "optional_packages" in summary["env"] and "carry_advice" in summary["env"]


def test_config_parsing_and_errors(tmp_path):
    from bench import configs
    from runtime.live.config import LiveConfig
    assert configs.parse_spec("steps=2, stream-batch=on,name=x") == ("x", {"steps": 2, "stream_batch": True})
    with pytest.raises(ValueError, match="unknown config key 'stpes'"):
        configs.parse_spec("stpes=2")
    with pytest.raises(ValueError, match="on/off"):
        configs.parse_spec("stream_batch=maybe")
    with pytest.raises(ValueError, match="not key=value"):
        configs.parse_spec("steps")
    with pytest.raises(ValueError, match="--window 99"):
        configs.build(LiveConfig(), [(None, {"window": 99})])
    toml = tmp_path / "runs.toml"
    toml.write_text('[[config]]\nname = "a"\nsteps = 1\n[[config]]\nstream_batch = true\n')
    runs = configs.build(LiveConfig(), configs.read_file(toml))
    assert [n for n, _ in runs] == ["a", "torch/fp32/lcm2/w15/sb/taesd"] and runs[1][1].stream_batch
    with pytest.raises(ValueError, match=r"\[\[config\]\]"):
        (tmp_path / "bad.toml").write_text("steps = 1\n")
        configs.read_file(tmp_path / "bad.toml")


def test_device_peak_table():
    from bench import devices
    assert devices.peak_tflops("NVIDIA H100 PCIe", "fp16") == 756.5
    assert devices.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert devices.peak_tflops("NVIDIA H200", "fp32") == 67.0
    assert devices.peak_tflops("NVIDIA H200", "fp32", tf32=True) == 494.5
    assert devices.peak_tflops("NVIDIA GeForce RTX 4090", "fp16") == 165.2
    assert devices.peak_tflops("Some Future GPU", "fp16") is None and devices.peak_tflops(None, "fp16") is None
    assert devices.describe(None)["peak"].startswith("n/a")
    assert devices.describe("Some Future GPU")["peak"].startswith("unknown")
    assert all(e.source for e in devices.PEAKS)


def test_custom_op_flop_formulas_match_the_kernels():
    """FlopCounterMode through the custom ops counts what kernels/*.py's flops() say (CPU reference path)."""
    pytest.importorskip("triton", reason="the custom ops register with kernels/ (Triton extra)")
    from bench.flops import count
    from kernels import reference_attention as ra
    q, k, v = (torch.randn(2, 9, 16) for _ in range(3))
    kr, vr = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    _, flops = count(torch.ops.xportrait.reference_attention, q, k, v, kr, vr, 2, 0.25)
    assert flops == ra.flops(2, 9, 9, 5, 16) > 0
    r, cache, pe = torch.randn(6, 16), torch.randn(4, 6, 16), torch.randn(24, 16)
    i = torch.zeros(1, dtype=torch.int32)
    _, flops = count(torch.ops.xportrait.motion_attention, r, r, r, cache, cache.clone(), pe, pe, i, i, 2, 0.25)
    assert flops == 4 * 6 * 16 * 4


def test_latency_runs_as_a_file():
    """`python bench/latency.py` puts bench/ first on sys.path, where bench/kernels.py would shadow the kernels
    package: the file removes it before importing anything of ours (runpy does what running the file does)."""
    code = ("import runpy, sys\n"
            "sys.argv = ['bench/latency.py', '--config', 'stpes=1']\n"
            "sys.path.insert(0, 'bench')\n"
            "try:\n    runpy.run_path('bench/latency.py', run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code)\n"
            "import kernels\nprint(kernels.__file__)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and out[0] == "exit 2" and "unknown config key 'stpes'" in proc.stderr, proc.stderr
    assert out[1].endswith("kernels/__init__.py"), out


def test_meta_device_flops_equal_the_measured_run(bench_run):
    """bench.flops on the meta device (no weights: how sd15 is counted on a CPU machine) counts what the
    real tiny run counted, stage by stage."""
    from runtime.live.config import LiveConfig
    from bench.flops import meta_live, session_flops
    out, _, _ = bench_run
    seq = json.loads((out / "latency.json").read_text())["configs"][0]
    cfg = LiveConfig(preset="tiny", steps=1, window=2, device="meta")
    src = torch.zeros(128, 128, 3, dtype=torch.uint8)
    f = session_flops(meta_live(cfg), src, src.to("meta"), src.to("meta"))
    assert f["per_frame"] == seq["flops"]["per_frame"] and f["per_source"] == seq["flops"]["per_source"]
