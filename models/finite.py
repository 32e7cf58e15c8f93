"""Finite checks: NaN/Inf in latents, frames or weights become an error that names the likely cause.

A checkpoint with NaN/Inf weights, or an fp16 overflow, turns every frame black (or noise) without
any error. Two ways to catch it:

* `check_finite(x, what)`: blocking (one host sync), for offline commands and for weights;
* `FiniteMonitor`: for the live path. `update(x, stage)` folds `isfinite(x).all()` into a device
  flag with two small kernels and no host sync; every `every` updates it starts a non-blocking
  copy of the flag to pinned host memory behind a CUDA event, and `poll()` reads it only once that
  event has completed. So a bad frame is reported a few frames late, and the frame loop never
  waits for the GPU. On the CPU the copy is synchronous and cheap.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

LIKELY_CAUSES = ("likely causes: NaN/Inf weights in the checkpoint (check it with `python -m models.weights "
                 "check-keys FILE --preset P`, then re-download it), or an fp16 overflow: try --dtype bf16 "
                 "or --dtype fp32")


class NonFiniteError(RuntimeError):
    """NaN or Inf where finite values are needed; the message names what and the likely cause."""


def _counts(x: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) with one host sync."""
    c = torch.stack([torch.isnan(x).sum(), torch.isinf(x).sum()]).tolist()
    return int(c[0]), int(c[1])


def check_finite(x: torch.Tensor, what: str, hint: str = LIKELY_CAUSES) -> torch.Tensor:
    """Raise NonFiniteError if `x` holds NaN or Inf (blocking); return `x` unchanged otherwise."""
    if not (x.is_floating_point() or x.is_complex()) or bool(torch.isfinite(x).all()):
        return x
    nan, inf = _counts(x)
    raise NonFiniteError(f"{what} has {nan} NaN and {inf} Inf values out of {x.numel()} "
                         f"(shape {tuple(x.shape)}, {str(x.dtype).removeprefix('torch.')}); {hint}")


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or Inf (one host sync for all of them)."""
    per_device: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    for name, t in named:
        if t.is_floating_point() and t.device.type != "meta" and t.numel():
            names, flags = per_device.setdefault(t.device, ([], []))
            names.append(name)
            flags.append((~torch.isfinite(t)).any())
    bad = []
    for names, flags in per_device.values():
        bad += [n for n, b in zip(names, torch.stack(flags).tolist()) if b]
    return bad


def check_weights_finite(named: Iterable[tuple[str, torch.Tensor]], what: str, hint: str = LIKELY_CAUSES) -> None:
    """Raise NonFiniteError naming the tensors of `what` (a file path or model) that hold NaN/Inf."""
    bad = nonfinite_tensors(named)
    if bad:
        head = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise NonFiniteError(f"{what}: {len(bad)} tensors hold NaN/Inf values ({head}); {hint}")


class FiniteMonitor:
    """Device-side NaN/Inf flag for a frame loop: `update` never syncs, `poll` never blocks.

        mon = FiniteMonitor(device, every=8)
        for frame in stream:
            latent = step(...); mon.update(latent, "latent")
            image = decode(latent); mon.update(image, "frame")
            if (err := mon.poll()) is not None:   # reported a few frames after the bad one
                raise err
    """

    MAX_STAGES = 62

    def __init__(self, device: str | torch.device = "cpu", every: int = 8, hint: str = LIKELY_CAUSES):
        if every < 1:
            raise ValueError(f"FiniteMonitor every={every}: must be >= 1")
        self.device, self.every, self.hint = torch.device(device), every, hint
        cuda = self.device.type == "cuda"
        self._bits = torch.zeros((), dtype=torch.int64, device=self.device)  # bit k: stage k saw NaN/Inf
        self._host = torch.zeros((), dtype=torch.int64, pin_memory=cuda)
        self._event = None
        self._pending = False
        self._stages: dict[str, int] = {}
        self.updates = 0
        self.error: NonFiniteError | None = None

    def _bit(self, stage: str) -> int:
        if stage not in self._stages:
            if len(self._stages) >= self.MAX_STAGES:
                raise ValueError(f"FiniteMonitor: more than {self.MAX_STAGES} stage names")
            self._stages[stage] = len(self._stages)
        return self._stages[stage]

    def update(self, x: torch.Tensor, stage: str = "frame") -> None:
        """Fold `isfinite(x).all()` into the device flag (queued work only; CUDA-graph friendly)."""
        bad = (~torch.isfinite(x)).any().to(torch.int64)
        self._bits.bitwise_or_(bad * (1 << self._bit(stage)))
        self.updates += 1
        if self.updates % self.every == 0 and not self._pending:
            self._start_read()

    def _start_read(self) -> None:
        if self.device.type == "cuda":
            self._host.copy_(self._bits, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host.copy_(self._bits)
        self._pending = True

    def poll(self) -> NonFiniteError | None:
        """The error once a NaN/Inf has been seen and its flag has reached the host, else None."""
        if self.error is None and self._pending and (self._event is None or self._event.query()):
            self._pending = False
            bits = int(self._host)
            if bits:
                stages = [s for s, k in self._stages.items() if bits >> k & 1]
                self.error = NonFiniteError(f"NaN/Inf values in the {' and '.join(stages)} of the live stream; "
                                            f"{self.hint}")
        return self.error

    def check(self) -> None:
        """Blocking: read the flag now (e.g. at the end of a run) and raise if anything was non-finite."""
        if self._pending and self._event is not None:
            self._event.synchronize()
        self._start_read()
        if self._event is not None:
            self._event.synchronize()
        err = self.poll()
        if err is not None:
            raise err
