"""The official-style pipeline, timed on the same machine as the live configurations (issue 9, item 2).

What the official X-Portrait inference does per denoising evaluation (spec §6, docs/pipeline.md), run
here with our reference model in fp32 eager PyTorch:

* the reference net, recomputed at every evaluation (the official code runs it at batch 16 for every
  window; here at batch 1, which is cheaper: the baseline is, if anything, flattered);
* both ControlNets with their hint encoders (the official ControlNet re-encodes the hint at every call);
* the conditional main UNet over a T-frame window, and CFG 5 with the official unconditional branch
  (the same UNet with plain self-attention, no reference, no ControlNets);
* 31 evaluations per frame (DDIM, 30 steps on the official grid), then the full KL-VAE decode.

A full run would take minutes per frame at sd15 size, so `evals` evaluations are timed after one
warm-up and scaled to 31; the output says so. Per frame: 31 x (one window evaluation) / T + one
frame's decode.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

OFFICIAL_EVALS = 31   # DDIM 30 steps on the official grid = 31 model evaluations
OFFICIAL_CFG = 5.0
OFFICIAL_WINDOW = 16


@dataclass(frozen=True)
class BaselineSpec:
    window: int = OFFICIAL_WINDOW   # frames per evaluation (the official temporal window)
    evals: int = 2                  # timed evaluations (after one warm-up), scaled to 31
    decode_batch: int = 2           # frames per timed KL-VAE decode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    """ms of fn(), synchronized (the baseline is timed off any hot path)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


@torch.inference_mode()
def run_baseline(model, context: torch.Tensor, size: int, spec: BaselineSpec, count_flops: bool = True,
                 seed: int = 0, progress=None) -> dict:
    """Time the official-style evaluation and decode. `model` is an fp32 XPortrait (models/xportrait.py)."""
    from models.samplers import ddim_timesteps
    from models.xportrait import Conditioning
    p = next(model.unet.parameters())
    if p.dtype != torch.float32:
        raise ValueError(f"the official-style baseline runs in fp32; got a {p.dtype} model")
    device, T = p.device, spec.window
    if T < 1 or spec.evals < 1 or spec.decode_batch < 1:
        raise ValueError(f"baseline window/evals/decode batch must be >= 1, got {spec}")
    g = torch.Generator().manual_seed(seed)
    h = size // 8
    image = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device)
    hints = [(torch.rand(T, 3, size, size, generator=g) * 2 - 1).to(device) for _ in range(2)]
    x = torch.randn(T, 4, h, h, generator=g).to(device)
    ctx = context.to(device, torch.float32)[:1].expand(T, -1, -1)
    cond = Conditioning(model.source_latent(image), hints[0], hints[1])
    grid = ddim_timesteps(OFFICIAL_EVALS - 1)

    def evaluate(i: int):
        t = torch.full((T,), int(grid[i % len(grid)]), dtype=torch.long, device=device)
        return model.eps_cfg(x, t, ctx, cond, OFFICIAL_CFG, frames=T)

    _timed(lambda: evaluate(0), device)  # warm-up
    eval_ms = []
    for i in range(spec.evals):
        eval_ms.append(_timed(lambda: evaluate(i + 1), device))
        if progress is not None:
            progress(1)
    z = torch.randn(spec.decode_batch, 4, h, h, generator=g).to(device)
    _timed(lambda: model.decode(z[:1]), device)  # warm-up
    decode_ms = _timed(lambda: model.decode(z), device) / spec.decode_batch
    eval_med = statistics.median(eval_ms)
    frame_ms = OFFICIAL_EVALS * eval_med / T + decode_ms
    out = {
        "method": (f"official-style pipeline, fp32 eager: {spec.evals} evaluation(s) of a {T}-frame window timed "
                   f"(after 1 warm-up) and scaled to {OFFICIAL_EVALS} DDIM evaluations; each evaluation recomputes "
                   f"the reference net (batch 1) and both hint encoders, runs both ControlNets and the conditional "
                   f"UNet, and the official unconditional UNet for CFG {OFFICIAL_CFG:g}; plus the full KL-VAE "
                   f"decode per frame"),
        "window": T, "evals_timed": spec.evals, "evals_scaled_to": OFFICIAL_EVALS, "cfg": OFFICIAL_CFG,
        "eval_ms": eval_ms, "eval_ms_p50": eval_med, "decode_ms_per_frame": decode_ms,
        "frame_ms": frame_ms, "fps": 1e3 / frame_ms,
    }
    if count_flops:
        from bench.flops import count
        _, eval_flops = count(evaluate, 0)
        _, dec_flops = count(model.decode, z[:1])
        out["flops_per_eval"] = eval_flops
        out["flops_per_frame"] = OFFICIAL_EVALS * eval_flops // T + dec_flops
    return out
