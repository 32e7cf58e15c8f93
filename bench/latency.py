"""End-to-end latency benchmark of the live runtime: per stage, per frame, capture -> presented, FLOPs.

    python -m bench.latency                                       # tiny preset, CPU, one configuration
    python -m bench.latency --preset tiny --frames 10 --config "steps=1" --config "steps=2,stream_batch=on"
    python -m bench.latency --preset sd15 --config "backend=torch" --config "steps=1" --config "steps=4" \
        --config "stream_batch=on" --out artifacts/bench/sd15      # on a GPU
    python bench/latency.py --configs runs.toml                    # [[config]] tables (bench/configs.py)

For every configuration it drives the real LiveSession (runtime/live/session.py):
1. session: `--frames` frames after `--warmup`, each `session.step` with a StageClock (CUDA events on a
   GPU, perf_counter on the CPU) and a synchronize after it (the benchmark's own, outside the
   runtime): per-stage and per-frame median/p90/p99, and the device-bound FPS;
2. pipeline: the threaded live pipeline (runtime/live/pipeline.py) fed by a synthetic camera at
   `--source-fps`, face tracking included: capture -> presented latency and sustained FPS;
3. FLOPs per stage from FlopCounterMode on the torch graphs (bench/flops.py) and the achieved share of
   the device's dense peak (bench/devices.py; n/a on the CPU); peak GPU memory and session memory.
The official-style baseline (bench/baseline.py) runs in the same process; speed-up = its time per frame
over each configuration's median frame time. Writes latency.json, configs.csv, stages.csv and
latency.png to --out (atomically), shows progress on stderr and prints a short table last.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python bench/latency.py`: bench/ must not shadow `kernels`
    _ROOT = Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]
    sys.path.insert(0, str(_ROOT))

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import torch  # noqa: E402

from bench import configs as configs_mod  # noqa: E402
from bench.baseline import BaselineSpec  # noqa: E402
from bench.pipeline_run import PipelineSpec  # noqa: E402
from bench.report import SCHEMA, dist, stage_dists  # noqa: E402
from runtime.live.config import BACKENDS, DECODERS, DTYPES, LIVE_PRESETS, LiveConfig  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("base configuration (runtime/live/config.py; each --config varies it)")
    g.add_argument("--preset", default="tiny", choices=sorted(LIVE_PRESETS), help="live preset (default tiny)")
    g.add_argument("--resolution", type=int, help="square pixels (multiple of 64)")
    g.add_argument("--steps", type=int)
    g.add_argument("--sampler", choices=["lcm", "tcd", "ddim"])
    g.add_argument("--backend", choices=BACKENDS, help="torch (eager), torch-kernels (Triton + CUDA graphs), ort, trt")
    g.add_argument("--dtype", choices=list(DTYPES), help="torch backends: fp32, fp16, bf16")
    g.add_argument("--window", type=int, help="past frames the motion modules see (0-15)")
    g.add_argument("--stream-batch", choices=["on", "off"])
    g.add_argument("--decoder", choices=DECODERS)
    g.add_argument("--device", help="cpu or cuda[:N] (default: the preset's)")
    g.add_argument("--seed", type=int)
    g.add_argument("--no-cuda-graphs", action="store_true", help="torch-kernels without CUDA-graph replay")
    g.add_argument("--engines", type=Path, help="export folder for --backend ort/trt")
    g.add_argument("--checkpoint", type=Path, help="X-Portrait weights (default: seeded random weights)")
    g.add_argument("--taesd", type=Path, help="TAESD weights (needed with --checkpoint for decoder taesd)")
    v = p.add_argument_group("configurations and measurement")
    v.add_argument("--config", action="append", default=[], metavar="K=V,...",
                   help='a variation of the base, e.g. "steps=2,window=15"; repeat for several')
    v.add_argument("--configs", type=Path, metavar="FILE", help="variations from a .json list or .toml [[config]]")
    v.add_argument("--frames", type=int, default=30, help="timed frames per configuration (default 30)")
    v.add_argument("--warmup", type=int, default=5, help="untimed frames first (default 5)")
    v.add_argument("--pipeline-frames", type=int, help="frames presented by the threaded pipeline (default: "
                   "--frames; 0 skips the pipeline phase)")
    v.add_argument("--source-fps", type=float, default=60.0, help="synthetic camera rate (default 60)")
    v.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    v.add_argument("--no-baseline", action="store_true", help="skip the official-style baseline")
    v.add_argument("--baseline-window", type=int, default=16, help="frames per baseline evaluation (default 16)")
    v.add_argument("--baseline-evals", type=int, default=2, help="timed baseline evaluations (default 2)")
    v.add_argument("--time-budget", type=float, help="seconds; configurations not started by then are skipped")
    v.add_argument("--threads", type=int, help="torch CPU threads")
    v.add_argument("--out", type=Path, default=Path("artifacts/bench/latency"), help="output folder")
    v.add_argument("--no-chart", action="store_true")
    from models.cli import add_debug_flag
    add_debug_flag(p)
    return p


def base_config(a: argparse.Namespace) -> LiveConfig:
    flags = {"resolution": a.resolution, "steps": a.steps, "sampler": a.sampler, "backend": a.backend,
             "dtype": a.dtype, "window": a.window, "decoder": a.decoder, "device": a.device, "seed": a.seed,
             "stream_batch": None if a.stream_batch is None else a.stream_batch == "on",
             "cuda_graphs": False if a.no_cuda_graphs else None}
    return LiveConfig.from_name(a.preset, **{k: v for k, v in flags.items() if v is not None})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModelCache:
    """Weights loaded once per (preset, device, dtype, seed); an fp16/bf16 copy is made from a loaded fp32
    model instead of re-initialising 3 B parameters. Graphs are built per configuration."""

    def __init__(self, checkpoint=None, taesd=None, engines=None):
        self.checkpoint, self.taesd, self.engines = checkpoint, taesd, engines
        self._models: dict[tuple, object] = {}
        self.load_s = 0.0

    def models(self, preset: str, device: str, dtype: torch.dtype, seed: int):
        from runtime.pipeline import Models, load_models
        key = (preset, device, dtype, seed)
        if key not in self._models:
            t0 = time.perf_counter()
            base = self._models.get((preset, device, torch.float32, seed))
            if base is not None:
                model = copy.deepcopy(base.model).to(dtype)
                model.first_stage_model.float()  # as load_models: the KL VAE stays fp32
                taesd = None if base.taesd is None else copy.deepcopy(base.taesd).to(dtype)
                self._models[key] = Models(model, base.context.to(dtype), taesd, base.random_weights, base.notes)
            else:
                self._models[key] = load_models(preset, checkpoint=self.checkpoint, taesd=self.taesd,
                                                need_taesd=self.checkpoint is None or self.taesd is not None,
                                                seed=seed, device=device, dtype=dtype)
            self.load_s += time.perf_counter() - t0
        return self._models[key]

    def live(self, cfg: LiveConfig):
        """A LiveModel for cfg, built as runtime.live.factory.load_live builds it, over cached weights."""
        from runtime.live.factory import live_from_models, load_live
        if cfg.backend in ("ort", "trt"):
            return load_live(cfg, engines=self.engines)
        return live_from_models(cfg, self.models(cfg.preset, cfg.device, cfg.torch_dtype, cfg.seed))


@dataclass
class Tracking:
    source: torch.Tensor      # (R, R, 3) uint8 source portrait
    hints: list[tuple]        # (pose, local) uint8 numpy pairs from the tracker over the driving clip
    frames: list              # driving frames for the synthetic camera
    make_tracker: object      # () -> tracker
    description: str


def prepare_tracking(size: int, n_hints: int = 8) -> Tracking:
    from bench.pipeline_run import driving_frames, make_tracking
    image, make_tracker, description = make_tracking(size)
    frames = driving_frames()
    tracker, hints, t = make_tracker(), [], 0.0
    for rgb in frames:
        h = tracker(rgb, t)
        t += 1 / 15
        if h is not None:
            hints.append((h.pose, h.local))
        if len(hints) >= n_hints:
            break
    if not hints:
        raise RuntimeError("the tracker found no face in samples/driving.mp4")
    return Tracking(torch.from_numpy(image), hints, frames, make_tracker, description)


def time_session(session, tracking: Tracking, frames: int, warmup: int, advance) -> dict:
    """Per-stage and per-frame times of `frames` session.step calls (after `warmup`)."""
    from runtime.live.clock import StageClock
    dev = session.device
    hints = [(torch.from_numpy(p).to(dev), torch.from_numpy(q).to(dev)) for p, q in tracking.hints]
    clock = StageClock(dev, stages=2 * session.steps + 8)
    _sync(dev)
    t0 = time.perf_counter()
    session.set_source(tracking.source)
    _sync(dev)
    source_ms = (time.perf_counter() - t0) * 1e3
    per_frame, frame_ms = [], []
    for k in range(warmup + frames):
        pose, local = hints[k % len(hints)]
        _sync(dev)
        t0 = time.perf_counter()
        clock.start()
        session.step(pose, local, tag=k, clock=clock)
        _sync(dev)
        ms = (time.perf_counter() - t0) * 1e3
        if k >= warmup:
            per_frame.append(clock.read())
            frame_ms.append(ms)
        advance(1)
    return {"source_ms": source_ms, "stages": stage_dists(per_frame), "frame_ms": dist(frame_ms),
            "frame_series": frame_ms}


def summarise_pipeline(raw: dict, tracker: str) -> dict:
    recs = raw["records"]
    t0 = recs[0][0] if recs else 0.0
    span = recs[-1][0] - t0 if len(recs) > 1 else 0.0
    lat = dist([r[1] for r in recs])
    lat["max"] = max((r[1] for r in recs), default=None)
    return {"frames_presented": len(recs), "fps_sustained": (len(recs) - 1) / span if span > 0 else None,
            "latency_ms": lat, "stages": stage_dists([r[2] for r in recs]), "dropped": raw["dropped"],
            "frames_in": raw["frames_in"], "no_face": raw["no_face"], "timed_out": raw["timed_out"],
            "source_fps": raw["source_fps"], "tracker": tracker,
            "series": [(round(r[0] - t0, 4), round(r[1], 3)) for r in recs]}


def _memory(cfg: LiveConfig, session_mem: dict, alloc0: int) -> dict:
    out = {"session": session_mem}
    if cfg.device.startswith("cuda"):
        out.update(weights_and_caches_mib=alloc0 / 2**20,
                   peak_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                   peak_reserved_mib=torch.cuda.max_memory_reserved() / 2**20)
    return out


def _attach_flops(rec: dict, flops: dict, peak: float | None) -> None:
    rec["flops"] = flops
    for stage, d in rec["stages"].items():
        f = flops["per_frame"].get(stage, 0)
        d["flops"] = f
        d["tflops"] = f / (d["p50"] * 1e-3) / 1e12 if f and d["p50"] > 0 else None
        d["peak_share"] = None if peak is None or d["tflops"] is None else d["tflops"] / peak
    p50 = rec["frame_ms"]["p50"]
    rec["tflops"] = flops["total_per_frame"] / (p50 * 1e-3) / 1e12 if p50 > 0 else None
    rec["peak_share"] = None if peak is None or rec["tflops"] is None else rec["tflops"] / peak


def measure_config(name: str, cfg: LiveConfig, cache: ModelCache, tracking: Tracking, a, flops_cache: dict,
                   device_name: str | None, bar) -> dict:
    from bench.devices import peak_tflops
    from bench.flops import session_flops
    from bench.pipeline_run import run_pipeline
    rec = {"name": name, "config": cfg.to_dict(), "status": "ok"}
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    live = cache.live(cfg)
    rec["notes"] = list(live.notes)
    alloc0 = torch.cuda.memory_allocated() if cuda else 0
    session = live.new_session()
    timed = time_session(session, tracking, a.frames, a.warmup, bar)
    rec.update(source_ms=timed["source_ms"], stages=timed["stages"], frame_ms=timed["frame_ms"],
               frame_series=timed["frame_series"], fps_device=1e3 / timed["frame_ms"]["p50"])
    session_mem = session.memory()
    del session
    n_pipe = a.frames if a.pipeline_frames is None else a.pipeline_frames
    if n_pipe > 0:
        session = live.new_session()
        session.set_source(tracking.source)
        spec = PipelineSpec(frames=n_pipe, warmup=min(a.warmup, 3), source_fps=a.source_fps)
        raw = run_pipeline(session, tracking.frames, tracking.make_tracker(), spec, bar)
        rec["pipeline"] = summarise_pipeline(raw, tracking.description)
        del session
    rec["memory"] = _memory(cfg, session_mem, alloc0)
    if not a.no_flops:
        key = (cfg.preset, cfg.resolution, cfg.steps, cfg.window, cfg.stream_batch, cfg.encoder, cfg.decoder)
        if key not in flops_cache:
            counter = live if cfg.backend.startswith("torch") else cache.live(
                replace(cfg, backend="torch", dtype="fp16" if cuda else "fp32"))
            pose, local = (torch.from_numpy(x).to(cfg.device) for x in tracking.hints[0])
            flops_cache[key] = session_flops(counter, tracking.source, pose, local)
            flops_cache[key]["counted_on"] = "torch eager graphs of this configuration (FlopCounterMode)"
        dtype = cfg.dtype if cfg.backend.startswith("torch") else "fp16"
        peak = peak_tflops(device_name, dtype, torch.backends.cuda.matmul.allow_tf32) if cuda else None
        _attach_flops(rec, flops_cache[key], peak)
    return rec


def environment(device: str) -> dict:
    from bench.devices import describe
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(torch.device(device)) if cuda else None
    env = {"device": name or f"CPU ({platform.processor() or platform.machine()})", "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
           "cpu_count": __import__("os").cpu_count(), "peak": describe(name)}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _bar(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, mininterval=1.0, file=sys.stderr)


def _baseline(cache: ModelCache, base: LiveConfig, a) -> dict:
    from bench.baseline import run_baseline
    spec = BaselineSpec(window=a.baseline_window, evals=a.baseline_evals)
    m = cache.models(base.preset, base.device, torch.float32, base.seed)
    bar = _bar(spec.evals, "baseline")
    try:
        out = run_baseline(m.model, m.context, base.image_size(), spec, count_flops=not a.no_flops, seed=base.seed,
                           progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    return {"status": "ok", **out}


def run(a: argparse.Namespace) -> dict:
    """Measure every configuration; returns the result dict that is written as latency.json."""
    if a.threads:
        torch.set_num_threads(a.threads)
    base = base_config(a)
    variations = [configs_mod.parse_spec(s) for s in a.config]
    if a.configs:
        variations += configs_mod.read_file(a.configs)
    runs = configs_mod.build(base, variations)  # validates everything before any model is loaded
    if a.frames < 1 or a.warmup < 0:
        raise ValueError("--frames must be >= 1 and --warmup >= 0")
    t_start = time.perf_counter()
    cache = ModelCache(a.checkpoint, a.taesd, a.engines)
    env = environment(base.device)
    result = {"schema": SCHEMA,
              "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join(sys.argv), "env": env, "baseline": None, "configs": []}
    baseline_devices = {cfg.device for _, cfg in runs}
    if not a.no_baseline:
        if len(baseline_devices) > 1:
            raise ValueError("the baseline runs on one device: give all configurations the same --device")
        try:
            result["baseline"] = _baseline(cache, base, a)
        except (RuntimeError, ValueError) as e:
            result["baseline"] = {"status": f"error: {e}"}
    sizes = {cfg.image_size() for _, cfg in runs}
    tracking = {s: prepare_tracking(s) for s in sizes}
    env["tracker"] = next(iter(tracking.values())).description
    flops_cache: dict = {}
    n_pipe = a.frames if a.pipeline_frames is None else a.pipeline_frames
    outer = _bar(len(runs), "configurations")
    for name, cfg in runs:
        if a.time_budget is not None and time.perf_counter() - t_start > a.time_budget:
            result["configs"].append({"name": name, "config": cfg.to_dict(),
                                      "status": f"skipped: time budget of {a.time_budget:.0f} s spent"})
            continue
        bar = _bar(a.warmup + a.frames + n_pipe, name)
        try:
            rec = measure_config(name, cfg, cache, tracking[cfg.image_size()], a, flops_cache, env_device(env, cfg),
                                 bar.update if bar else (lambda n: None))
        except (RuntimeError, ValueError, FileNotFoundError, ImportError, torch.cuda.OutOfMemoryError) as e:
            rec = {"name": name, "config": cfg.to_dict(), "status": f"error: {type(e).__name__}: {e}"}
        finally:
            if bar:
                bar.close()
        b = result["baseline"]
        if rec["status"] == "ok" and b and b.get("frame_ms"):
            rec["speedup_vs_baseline"] = b["frame_ms"] / rec["frame_ms"]["p50"]
        result["configs"].append(rec)
        if outer:
            outer.update(1)
        gc.collect()
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if outer:
        outer.close()
    result["load_s"] = cache.load_s
    result["wall_s"] = time.perf_counter() - t_start
    return result


def env_device(env: dict, cfg: LiveConfig) -> str | None:
    return env["device"] if cfg.device.startswith("cuda") else None


def check_files(a: argparse.Namespace) -> None:
    """Before any work: every input file exists; --out is a folder that exists or can be made, writable,
    and none of its output files is an input."""
    from models.fileio import check_output_path
    for flag, path in (("--checkpoint", a.checkpoint), ("--taesd", a.taesd), ("--engines", a.engines)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    names = ["latency.json", "configs.csv", "stages.csv"] + ([] if a.no_chart else ["latency.png"])
    for name in names:
        check_output_path(a.out / name, inputs=(a.configs, a.checkpoint, a.taesd), flag="--out")


def _main(argv=None) -> int:
    a = parser().parse_args(argv)
    from bench.report import table, write_all
    try:
        check_files(a)
        result = run(a)
        paths = write_all(a.out, result)
    except (ValueError, OSError, KeyError, ImportError) as e:  # documented: 2 = bad options (1 = a config failed)
        from models.cli import one_line
        if a.debug:
            import traceback
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if not a.no_chart:
        try:
            from bench.chart import write_chart
            paths["chart"] = write_chart(result, a.out / "latency.png")
        except ImportError:
            print("bench.latency: matplotlib is not installed, no chart (pip install matplotlib)", file=sys.stderr)
        except ValueError as e:
            print(f"bench.latency: no chart: {e}", file=sys.stderr)
    print(table(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if all(c["status"] == "ok" for c in result["configs"]) else 1


def main(argv=None) -> int:
    """Exit 0: every configuration ran; 1: one failed (its status says why); 2: bad options, files or --out
    (one `error:` line, before any model loads where it can be checked); 3: a bug; 130/143: Ctrl-C/SIGTERM."""
    from models.cli import run_main
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
