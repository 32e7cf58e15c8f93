"""FLOPs per stage, counted by torch.utils.flop_counter.FlopCounterMode on the torch graphs (not guessed).

FlopCounterMode counts matmuls, convolutions and attention (2 FLOPs per multiply-add); elementwise
work (norms, activations, the sampler's affine step) counts 0. The Triton kernels are torch custom ops
that it cannot look into, so their formulas are passed in here (`CUSTOM_FLOPS`):

* reference attention: QK^T and P·V over the frame's own keys plus the reference keys,
  kernels.reference_attention.flops (4·B·N·(NK+M)·C);
* motion attention: one query per row over the L ring slots (n_past + 1 = L once the ring is full,
  the steady state; the torch path also computes all L slots): 4·R·C·L;
* the CPU's fused SDPA (aten._scaled_dot_product_flash_attention_for_cpu), missing from torch's table:
  without it a CPU count drops every attention (tests/test_bench.py caught that against the meta count).

Counting runs the graphs eagerly: CUDA-graph replays are unwrapped (a replay dispatches no ops), so
the count is the same for eager, kernel and graph-replay backends of one configuration.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

# graph role (runtime/live/graphs.py) -> the stage it is timed in (runtime/live/session.py marks)
ROLE_STAGE = {"hint": "hint", "control": "control", "unet_stream": "unet", "decoder": "decode",
              "encoder": "source", "reference": "source"}


def _reference_attention_flops(q_shape, k_shape, v_shape, kr_shape, vr_shape, *args, out_shape=None, **kw) -> int:
    b, n, c = q_shape
    return 4 * b * n * (k_shape[1] + kr_shape[1]) * c


def _motion_attention_flops(q_shape, kn_shape, vn_shape, kc_shape, *args, out_shape=None, **kw) -> int:
    r, c = q_shape
    return 4 * r * c * kc_shape[0]


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kw) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def custom_flops() -> dict:
    """FlopCounterMode custom_mapping: this project's custom ops (those that are registered), and the CPU's
    fused SDPA, which torch's own table lacks (the CUDA flash/efficient/cuDNN ones are in it)."""
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _sdpa_cpu_flops
    try:
        import kernels.motion_attention  # noqa: F401  (registers torch.ops.xportrait.*)
        import kernels.reference_attention  # noqa: F401
    except ImportError:
        return mapping
    ops = torch.ops.xportrait
    for name, fn in (("reference_attention", _reference_attention_flops),
                     ("motion_attention", _motion_attention_flops)):
        if hasattr(ops, name):
            mapping[getattr(ops, name)] = fn
    return mapping


def count(fn: Callable, *args, **kwargs) -> tuple[object, int]:
    """(fn(*args, **kwargs), FLOPs it dispatched)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=custom_flops()) as counter:
        out = fn(*args, **kwargs)
    return out, int(counter.get_total_flops())


def _eager(runner):
    from runtime.live.cudagraph import GraphReplay
    return runner.runner if isinstance(runner, GraphReplay) else runner


@contextmanager
def counting_graphs(graphs, totals: dict[str, int], enabled: Callable[[], bool]):
    """Within the block, every graph call runs eagerly; while enabled() is true its FLOPs are added
    to totals[stage]. The graphs' runners are restored afterwards."""
    saved = dict(graphs.runners)

    def wrap(role, runner):
        def call(feed):
            if not enabled():
                return runner(feed)
            out, flops = count(runner, feed)
            stage = ROLE_STAGE.get(role, role)
            totals[stage] = totals.get(stage, 0) + flops
            return out
        return call

    graphs.runners.update({role: wrap(role, _eager(r)) for role, r in saved.items()})
    try:
        yield totals
    finally:
        graphs.runners.clear()
        graphs.runners.update(saved)


def session_flops(live, source: torch.Tensor, pose: torch.Tensor, local: torch.Tensor, **overrides) -> dict:
    """FLOPs of one steady-state frame of a fresh session of `live` (a LiveModel), by stage, plus the
    per-source work. Frames before the counted one run uncounted: one (one-time work such as the motion
    modules' cached positional tables stays out), or `steps` for the stream batch (its pipeline fills)."""
    session = live.new_session(**overrides)
    per_frame: dict[str, int] = {}
    per_source: dict[str, int] = {}
    state = {"on": True}
    with counting_graphs(session.graphs, per_source, lambda: state["on"]):
        session.set_source(source)
    state["on"] = False
    with counting_graphs(session.graphs, per_frame, lambda: state["on"]):
        for _ in range(session.steps if session.cfg.stream_batch else 1):
            session.step(pose, local)
        state["on"] = True
        out = session.step(pose, local)
    if out is None:
        raise RuntimeError("the counted frame produced no output (stream batch not filled)")
    return {"per_frame": per_frame, "per_source": per_source.get("source", 0),
            "total_per_frame": sum(per_frame.values())}


def meta_live(cfg):
    """A LiveModel of cfg's preset on the meta device: no weights, no compute, shapes only (FLOPs of sd15
    on any machine in seconds). cfg.device must be "meta"."""
    from models.config import XPortraitConfig
    from models.schedule import ddpm_buffers
    from models.taesd import TAESD
    from models.xportrait import XPortrait
    from runtime.live.factory import LiveModel, ring_layout
    from runtime.live.graphs import torch_graphs
    mc = XPortraitConfig.from_name(cfg.preset)
    with torch.device("meta"):
        model, taesd = XPortrait(mc).eval(), TAESD(mc.taesd).eval()
    graphs = torch_graphs(model, taesd, cfg.encoder, cfg.decoder, torch.float32)
    alphas = ddpm_buffers(mc.schedule)["alphas_cumprod"].float()
    return LiveModel(cfg, graphs, torch.zeros(1, 77, mc.unet.context_dim), alphas,
                     ring_layout(cfg.preset, cfg.image_size()), True)


def main(argv=None) -> int:
    """python -m bench.flops --preset sd15 [--steps 2] [--stream-batch] [--decoder vae]: FLOPs per frame by
    stage (meta device, no GPU needed) and the time floor at a given rate."""
    import argparse
    import sys
    from dataclasses import replace

    from bench.devices import PEAKS
    from runtime.live.config import LiveConfig
    ap = argparse.ArgumentParser(prog="python -m bench.flops", description=main.__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd15", choices=["tiny", "sd15"])
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--window", type=int, default=15)
    ap.add_argument("--stream-batch", action="store_true")
    ap.add_argument("--decoder", default="taesd", choices=["taesd", "vae"])
    ap.add_argument("--rate", type=float, default=790.0, help="TFLOP/s for the floor (default: the bf16 matmul "
                    "rate measured on this workplace's H200)")
    a = ap.parse_args(argv)
    try:
        cfg = replace(LiveConfig(preset=a.preset, resolution=a.resolution, steps=a.steps, window=a.window,
                                 stream_batch=a.stream_batch, decoder=a.decoder), device="meta").validated()
    except ValueError as e:
        print(f"bench.flops: {e}", file=sys.stderr)
        return 2
    size = cfg.image_size()
    src = torch.zeros(size, size, 3, dtype=torch.uint8)
    f = session_flops(meta_live(cfg), src, src.to("meta"), src.to("meta"))
    total = f["total_per_frame"]
    print(f"{cfg.preset} {size}^2, {cfg.steps} steps, window {cfg.window}, stream batch {cfg.stream_batch}, "
          f"decoder {cfg.decoder}: {total / 1e12:.3f} TFLOP per frame (per source: {f['per_source'] / 1e12:.3f})")
    for stage, n in f["per_frame"].items():
        print(f"  {stage:<8} {n / 1e9:9.1f} GFLOP  {100 * n / total:5.1f} %")
    floor = total / (a.rate * 1e12) * 1e3
    print(f"floor at {a.rate:g} TFLOP/s: {floor:.2f} ms per frame ({1e3 / floor:.0f} FPS); 60 FPS needs "
          f"{total * 60 / 1e12:.0f} TFLOP/s = {100 * total * 60 / 1e12 / a.rate:.0f} % of that rate")
    h200 = next(p for p in PEAKS if p.name == "H200 SXM")
    print(f"  (= {100 * total * 60 / 1e12 / h200.fp16:.0f} % of the H200's {h200.fp16:g} TFLOP/s dense fp16 datasheet peak)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
