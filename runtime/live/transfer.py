"""The per-frame device work of a live loop: hints up, the session's step, the image down.

Shared by the webcam pipeline (runtime/live/pipeline.py) and the browser server's device thread
(runtime/web/sessions.py). On CUDA the upload and the download run on their own copy streams, ordered
against the caller's current (compute) stream by events, through page-locked buffers; at most `inflight`
frames are queued on the GPU (the oldest one's event is waited for, normally long complete). Nothing
else waits on the GPU: the caller reads a result after `down.events[j].synchronize()` in its
presenting thread. On the CPU everything is synchronous.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np
import torch

from runtime.live.pinned import PinnedRing


class DeviceFrames:
    def __init__(self, device: torch.device, size: int, inflight: int = 2):
        self.device, self.cuda, self.inflight = device, device.type == "cuda", inflight
        self.up = PinnedRing((2, size, size, 3), device, 2)  # pose and local hints, uint8
        self._queued: deque = deque()
        if self.cuda:
            self.copy_in = torch.cuda.Stream(device)
            self.copy_out = torch.cuda.Stream(device)

    def run(self, session, pose: np.ndarray, local: np.ndarray, tag: Any, clock, down: PinnedRing,
            view: Callable | None = None) -> tuple[int, Any] | None:
        """One frame through `session.step` on the current stream; the image (or `view(image, depth,
        clock)`) goes into `down`'s next buffer. Returns (buffer index, the result's tag), or None while a
        stream batch fills up."""
        if len(self._queued) >= self.inflight:
            self._queued.popleft().synchronize()
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        i, host = self.up.next()
        host[0].numpy()[...] = pose
        host[1].numpy()[...] = local
        if self.cuda:
            with torch.cuda.stream(self.copy_in):
                dev = host.to(self.device, non_blocking=True)
                self.up.events[i].record()
            compute.wait_stream(self.copy_in)
            dev.record_stream(compute)
        else:
            dev = host
        clock.mark("upload")
        res = session.step(dev[0], dev[1], tag, clock=clock)
        if res is None:
            return None
        image = res.image if view is None else view(res.image, res.depth, clock)
        j, out = down.next()
        if self.cuda:
            self.copy_out.wait_stream(compute)
            with torch.cuda.stream(self.copy_out):
                out.copy_(image, non_blocking=True)
                image.record_stream(self.copy_out)
                clock.mark("download")
                down.events[j].record()
            done = torch.cuda.Event()
            done.record(compute)
            self._queued.append(done)
        else:
            out.copy_(image)
            clock.mark("download")
        return j, res.tag
