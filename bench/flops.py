"""FLOPs per stage, counted by torch.utils.flop_counter.FlopCounterMode on the torch graphs (not guessed).

FlopCounterMode counts matmuls, convolutions and attention (2 FLOPs per multiply-add); elementwise
work (norms, activations, the sampler's affine step) counts 0. The Triton kernels are torch custom ops
that it cannot look into, so their formulas are passed in here (`CUSTOM_FLOPS`):

* reference attention: QK^T and P·V over the frame's own keys plus the reference keys,
  kernels.reference_attention.flops (4·B·N·(NK+M)·C);
* motion attention: one query per row over the L ring slots (n_past + 1 = L once the ring is full,
  the steady state; the torch path also computes all L slots): 4·R·C·L.

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


def custom_flops() -> dict:
    """FlopCounterMode custom_mapping for this project's custom ops (those that are registered)."""
    mapping = {}
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
    per-source work. The stream batch first fills its pipeline (steps - 1 calls), uncounted."""
    session = live.new_session(**overrides)
    per_frame: dict[str, int] = {}
    per_source: dict[str, int] = {}
    state = {"on": True}
    with counting_graphs(session.graphs, per_source, lambda: state["on"]):
        session.set_source(source)
    state["on"] = False
    with counting_graphs(session.graphs, per_frame, lambda: state["on"]):
        for _ in range(session.steps - 1 if session.cfg.stream_batch else 0):
            session.step(pose, local)
        state["on"] = True
        out = session.step(pose, local)
    if out is None:
        raise RuntimeError("the counted frame produced no output (stream batch not filled)")
    return {"per_frame": per_frame, "per_source": per_source.get("source", 0),
            "total_per_frame": sum(per_frame.values())}
