"""Per-stage timing of one frame's device work without a host sync in the hot path.

On CUDA, `mark(name)` records an event on the current stream; the elapsed times are read later by
the presenting thread, after it has waited for the frame's last event anyway. On the CPU the work
is synchronous, so `mark` reads perf_counter. A pool of clocks is reused: no per-frame event
allocation.
"""
from __future__ import annotations

import time

import torch


class StageClock:
    def __init__(self, device: torch.device, stages: int = 12):
        self.cuda = device.type == "cuda"
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(stages + 1)] if self.cuda else []
        self._names: list[str] = []
        self._times: list[float] = []

    def start(self) -> None:
        self._names.clear()
        self._times.clear()
        self._stamp()

    def mark(self, name: str) -> None:
        """The work enqueued since the previous mark belongs to stage `name`."""
        self._names.append(name)
        self._stamp()

    def _stamp(self) -> None:
        if self.cuda:
            i = len(self._names)
            if i < len(self._events):
                self._events[i].record()
        else:
            self._times.append(time.perf_counter())

    def read(self) -> dict[str, float]:
        """ms per stage; on CUDA call it only after the last marked work has completed."""
        out: dict[str, float] = {}
        for i, name in enumerate(self._names):
            if self.cuda:
                if i + 1 >= len(self._events):
                    break
                ms = self._events[i].elapsed_time(self._events[i + 1])
            else:
                ms = (self._times[i + 1] - self._times[i]) * 1e3
            out[name] = out.get(name, 0.0) + ms
        return out
