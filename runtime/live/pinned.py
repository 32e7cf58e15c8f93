"""Host buffers for device transfers: page-locked on CUDA, each with an event that marks its last copy.

`next()` hands out the buffers in turn. With wait=True it first waits for the copy issued from/to that
buffer the previous time round (n frames ago, normally long complete), so a buffer is never rewritten
while a transfer still reads or writes it. On the CPU they are plain memory and there is nothing to wait for.
"""
from __future__ import annotations

import torch


class PinnedRing:
    def __init__(self, shape: tuple, device: torch.device, n: int):
        self.cuda = device.type == "cuda"
        self.bufs = [torch.empty(shape, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(n)]
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(n)]
        self.i = 0

    def next(self, wait: bool = True) -> tuple[int, torch.Tensor]:
        i = self.i
        self.i = (i + 1) % len(self.bufs)
        if wait and self.cuda:
            self.events[i].synchronize()
        return i, self.bufs[i]
