"""Fidelity of the live path, measured: streaming runtime vs the offline pipeline, fp16 vs fp32, kernels vs PyTorch.

    python -m bench.fidelity --out artifacts/fidelity            # tiny preset, shipped samples, CPU

The offline pipeline (runtime/pipeline.py) denoises 16-frame windows whose motion modules attend both
ways; the live session sees each frame once, with a causal ring of `window` past frames. Both get
the same weights, the same preprocessed hints (runtime/preprocess.py on the shipped clip), the same
x_T noise and the same fixed per-step noise, and decode with the KL VAE, so every difference comes
from the streaming design (or from precision / kernels in the other comparisons).
Reported per comparison: mean |difference| of uint8 frames (0-255) over all frames, its worst frame,
and PSNR (dB). With random weights the numbers measure the computation, not picture quality.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _u8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, as the pipelines write them."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = float((d ** 2).mean())
    return {"mean_abs": float(d.mean()), "worst_frame_mean_abs": float(d.reshape(len(d), -1).mean(1).max()),
            "max_abs": float(d.max()), "psnr_db": float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)}


def hints(frames: int, preset: str):
    from runtime.preprocess import preprocess
    from runtime.video_io import read_image, read_video
    from models.config import XPortraitConfig
    size = XPortraitConfig.from_name(preset).image_size
    video = read_video(ROOT / "samples" / "driving.mp4")
    return preprocess(read_image(ROOT / "samples" / "source.png"), video.frames[:frames], resolution=size)


def offline(pre, steps: int, seed: int, preset: str, checkpoint=None, device: str = "cpu") -> np.ndarray:
    from runtime.pipeline import SamplingConfig, animate, load_models
    models = load_models(preset, checkpoint=checkpoint, seed=seed, device=device)
    cfg = SamplingConfig(sampler="lcm", steps=steps, shared_noise=True, step_noise="fixed", seed=seed)
    res = animate(models.model, models.context, pre.source, pre.driving, pre.local, cfg)
    return _u8(res.images)


def live(pre, steps: int, seed: int, preset: str, window: int, checkpoint=None, device: str = "cpu",
         **over) -> np.ndarray:
    from runtime.live.config import LiveConfig
    from runtime.live.factory import load_live
    cfg = LiveConfig.from_name("tiny", preset=preset, steps=steps, window=window, decoder="vae", seed=seed,
                             device=device, **over)
    model = load_live(cfg, checkpoint=checkpoint)
    s = model.new_session()
    g = torch.Generator().manual_seed(seed)  # the offline pipeline's draws: x_T noise, then one fixed step noise
    init = torch.randn(s.noise_init.shape, generator=g)
    fixed = torch.randn(s.noise_init.shape, generator=g)
    s.set_noise(init, fixed.expand_as(s.noise).clone())
    s.set_source(pre.source)
    out = [s.step(p[None], q[None], k).image.cpu().numpy() for k, (p, q) in enumerate(zip(pre.driving, pre.local))]
    return np.stack(out)


def run(frames: int, steps: int, windows: list[int], seed: int, preset: str, kernels: bool, dtypes: bool,
        checkpoint=None, device: str = "cpu") -> list[dict]:
    pre = hints(frames, preset)
    rows = []
    t0 = time.perf_counter()
    ref = offline(pre, steps, seed, preset, checkpoint, device)
    print(f"offline: {len(ref)} frames in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    fp32 = {}
    for w in windows:
        fp32[w] = live(pre, steps, seed, preset, w, checkpoint, device)
        rows.append({"comparison": f"live window {w} vs offline 16-frame windows", **compare(fp32[w], ref)})
        print(rows[-1], file=sys.stderr)
    w = max(windows)
    n = min(frames, 6)  # fp16 and the Triton interpreter are slow on a CPU: the first frames only
    sub = replace(pre, driving=pre.driving[:n], local=pre.local[:n])
    if dtypes:
        for dt in ("bf16", "fp16"):
            rows.append({"comparison": f"live {dt} vs live fp32 (window {w}, {n} frames)",
                         **compare(live(sub, steps, seed, preset, w, checkpoint, device, dtype=dt), fp32[w][:n])})
            print(rows[-1], file=sys.stderr)
    if kernels:
        rows.append({"comparison": f"live Triton kernels vs PyTorch (window {w}, {n} frames)",
                     **compare(live(sub, steps, seed, preset, w, checkpoint, device, backend="torch-kernels"),
                             fp32[w][:n])})
        print(rows[-1], file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| comparison | mean abs (0-255) | worst frame | max abs | PSNR dB |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['comparison']} | {r['mean_abs']:.2f} | {r['worst_frame_mean_abs']:.2f} | "
                   f"{r['max_abs']:.0f} | {r['psnr_db']:.1f} |")
    return "\n".join(out)


def check_args(a: argparse.Namespace) -> None:
    """Flags, inputs and --out before any model is built (each message names its flag)."""
    from models.config import PRESETS
    from models.fileio import check_output_path
    if a.preset not in PRESETS:
        raise ValueError(f"--preset {a.preset}: unknown; choose one of {', '.join(sorted(PRESETS))}")
    if a.frames < 1:
        raise ValueError(f"--frames {a.frames}: must be >= 1")
    if not 1 <= a.steps <= 50:
        raise ValueError(f"--steps {a.steps}: must be in 1..50 (LCM)")
    bad = [w for w in a.windows if not 0 <= w <= 15]
    if bad:
        raise ValueError(f"--windows {' '.join(map(str, bad))}: each must be in 0..15")
    if a.checkpoint is not None and not a.checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {a.checkpoint}: no such file")
    check_output_path(a.out / "fidelity.json", (".json",), inputs=(a.checkpoint,), flag="--out")


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--windows", type=int, nargs="+", default=[0, 4, 8, 15])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, help="real X-Portrait weights (default: seeded random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-kernels", action="store_true", help="skip the Triton comparison (slow on the CPU)")
    p.add_argument("--no-dtypes", action="store_true", help="skip fp16/bf16")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "fidelity", help="output folder")
    from models.cli import add_debug_flag
    add_debug_flag(p)
    a = p.parse_args(argv)
    check_args(a)
    if not torch.cuda.is_available():
        import os
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = run(a.frames, a.steps, a.windows, a.seed, a.preset, not a.no_kernels, not a.no_dtypes, a.checkpoint,
               a.device)
    meta = {"preset": a.preset, "frames": a.frames, "steps": a.steps, "seed": a.seed, "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "date": time.strftime("%Y-%m-%d")}
    from models.fileio import atomic_write
    atomic_write(a.out / "fidelity.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))
    return 0


def main(argv=None) -> int:
    """One `error: ...` line and the exit codes of models/cli.py (1: a bad flag or file, checked before any
    model is built; 2: usage; 130/143: Ctrl-C/SIGTERM, fidelity.json untouched); --debug: the traceback."""
    from models.cli import run_main
    return run_main(_main, argv, expected=(RuntimeError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
