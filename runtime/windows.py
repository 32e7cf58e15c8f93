"""Offline temporal windows: split a clip into 16-frame windows, average eps over overlaps.

The motion modules couple the frames of one window only (spec §5.1), so a clip longer than a
window is denoised the way the official sampler does it (spec §5.2, `ddim.py:500-549`): at every
step, windows of `size` frames start every `stride = size - overlap` frames from an offset, wrap
circularly (frame indices modulo N), each window gets its own eps prediction, and each frame's
eps is the plain mean over the windows that contain it. One sampler update then moves all frames.

Differences from the official code (its edge cases are bugs, not behaviour to keep):
* N <= size: one window holding every frame once, in natural order, whatever the offset (the
  official code repeats indices for N < 16 and its non-accumulating `+=` then drops
  contributions; for N <= overlap it builds no window and returns NaN). With a single window
  there is no seam to move, so the offset has no use. The motion modules take any window length
  up to their positional table (24); shorter than 16 is outside training but well defined.
* Contributions are accumulated with `index_add_`, so a frame appearing twice would still count
  twice; `plan` never produces duplicates within a window (size <= N there).
* Offsets: `offsets="fixed"` (default) uses offset 0 at every step, so results do not depend on
  a random stream; `offsets="random"` draws `randint(0, N-1)` per step from its own
  `random.Random(seed)`, the official scheme (reproducible, but not bit-identical to the official
  script's global `random` call order).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

OFFSET_MODES = ("fixed", "random")


@dataclass(frozen=True)
class WindowSpec:
    size: int = 16       # frames per window (the motion modules' trained length)
    overlap: int = 4     # frames shared by consecutive windows (official num_mix)
    offsets: str = "fixed"
    seed: int = 0        # for offsets="random"

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"window size must be >= 1, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"window overlap must be in [0, {self.size - 1}] for size {self.size}, got {self.overlap}")
        if self.offsets not in OFFSET_MODES:
            raise ValueError(f"window offsets must be one of {OFFSET_MODES}, got {self.offsets!r}")

    @property
    def stride(self) -> int:
        return self.size - self.overlap


def plan(n_frames: int, size: int = 16, overlap: int = 4, offset: int = 0) -> list[torch.Tensor]:
    """Frame indices of every window for one step: a list of LongTensors of length min(size, N).

    N > size: starts offset, offset + stride, ... while start < offset + N - overlap; window
    frames (start .. start + size - 1) mod N. The last start is >= offset + N - overlap - stride,
    so the windows reach offset + N - 1: every frame is covered at least once.
    """
    if n_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {n_frames}")
    if n_frames <= size:
        return [torch.arange(n_frames)]
    stride = size - overlap
    offset %= n_frames
    starts = range(offset, offset + n_frames - overlap, stride)
    return [(torch.arange(s, s + size)) % n_frames for s in starts]


class WindowSchedule:
    """The per-step window plans of one sampling run."""

    def __init__(self, spec: WindowSpec, n_frames: int):
        self.spec, self.n_frames = spec, n_frames
        self._rng = random.Random(spec.seed)
        self._offsets: list[int] = []

    def offset(self, step: int) -> int:
        if self.spec.offsets == "fixed":
            return 0
        while len(self._offsets) <= step:  # drawn in step order, so any query order gives the same values
            self._offsets.append(self._rng.randint(0, self.n_frames - 1))
        return self._offsets[step]

    def windows(self, step: int) -> list[torch.Tensor]:
        return plan(self.n_frames, self.spec.size, self.spec.overlap, self.offset(step))


def coverage(windows: list[torch.Tensor], n_frames: int) -> torch.Tensor:
    """(N,) number of windows containing each frame (the averaging denominators)."""
    counts = torch.zeros(n_frames)
    for idx in windows:
        counts.index_add_(0, idx, torch.ones(len(idx)))
    return counts


def windowed(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
             windows: list[torch.Tensor]) -> torch.Tensor:
    """Mean over windows of eps_fn(x[idx], idx), scattered back per frame. x: (N, C, h, w).

    eps_fn(x_window, idx) -> (len(idx), C, h, w) sees the window's frames in window order.
    """
    n = x.shape[0]
    total = torch.zeros_like(x, dtype=torch.float32)
    counts = coverage(windows, n)  # on the CPU: checking it needs no device sync
    if bool((counts == 0).any()):  # cannot happen with plan(); guards hand-made window lists
        raise ValueError(f"frames {torch.nonzero(counts == 0).flatten().tolist()} are in no window")
    counts = counts.to(x.device)
    for idx in windows:
        idx_d = idx.to(x.device)
        total.index_add_(0, idx_d, eps_fn(x.index_select(0, idx_d), idx).float())
    return (total / counts.view(-1, *([1] * (x.ndim - 1)))).to(x.dtype)
