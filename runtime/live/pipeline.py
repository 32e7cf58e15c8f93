"""The live loop: capture -> track -> device work -> present, each stage on its own thread.

    capture (FrameSource's grabber thread, latest frame wins)
      -> prepare thread: face tracking, pose/local hints (uint8)          -> LatestSlot
      -> device thread: pinned upload on a copy stream, the session on a
         compute stream, download into pinned memory on a copy stream      -> LatestSlot
      -> presenting thread (the caller's): waits for the frame's download
         event, draws the HUD, writes the sinks, logs latency

Every hand-off is a one-item LatestSlot, so a slow stage drops stale driving frames (counted) and
nothing queues: latency is bounded by a few frame times, whatever the run time. Streams are
ordered by events. The device thread never waits on the GPU except to bound the work in flight to
two frames (it waits for the event of the frame two before, which has normally long completed);
the only per-frame wait is the presenting thread's, on the frame it is about to show.

Commands from the UI (swap source, reset, move the light) are queued to the device thread and
applied between frames, on its stream.

rgbd sessions (runtime/live/depth.py): with a `view` (DepthView), the device thread turns each
Output's RGB + depth into one [RGB or relit RGB | depth] image on the device (stage "relight", or
"depth" without relighting), and the one download carries it: results are `view.panels` frames wide.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from runtime.live.clock import StageClock
from runtime.live.pinned import PinnedRing
from runtime.live.session import LiveSession
from runtime.live.slots import Closed, LatestSlot
from runtime.live.transfer import DeviceFrames

log = logging.getLogger(__name__)


@dataclass
class Tag:
    """Travels with a driving frame through the device work."""
    index: int
    t_capture: float
    face: bool
    driving: np.ndarray | None
    prep_ms: float
    t_device: float = 0.0


@dataclass
class Result:
    """A presented-ready frame: image on the host, its driving frame's tag, stage times (ms)."""
    image: np.ndarray
    tag: Tag
    stages: dict[str, float]


@dataclass
class Counters:
    frames_in: int = 0
    no_face: int = 0
    errors: list[str] = field(default_factory=list)


class Pipeline:
    """Runs a LiveSession on frames from `source`, hints from `tracker`; results via `results()`."""

    def __init__(self, session: LiveSession, source, tracker, every_frame: bool = False, view=None):
        self.session, self.source, self.tracker, self.view = session, source, tracker, view
        self.device = session.device
        self.cuda = self.device.type == "cuda"
        self.hints = LatestSlot(block=every_frame)
        self.out = LatestSlot(block=every_frame)
        self.commands: queue.Queue = queue.Queue()
        self.counters = Counters()
        self.status = "starting"
        self.last_camera: np.ndarray | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        r = session.size
        self._frames = DeviceFrames(self.device, r)
        width = r * (view.panels if view is not None else 1)
        self._down = PinnedRing((r, width, 3), self.device, 4)  # device writes one, slot holds one, presenter copies one
        if self.cuda:
            self.compute = torch.cuda.Stream(self.device)
        stages = 2 * getattr(session, "steps", 1) + 10  # per step control + unet; upload ... download
        self._clocks = [StageClock(self.device, stages) for _ in range(4)]

    # ----------------------------------------------------------------------------- control
    def start(self) -> "Pipeline":
        self.source.start()
        for target, name in ((self._prepare_loop, "prepare"), (self._device_loop, "device")):
            t = threading.Thread(target=self._guard(target), name=f"live-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _guard(self, fn):
        def run():
            try:
                fn()
            except Closed:
                pass
            except BaseException as e:  # surfaced to the presenting thread by results()
                self._error = e
                self.stop()
        return run

    def stop(self) -> None:
        self._stop.set()
        self.hints.close()
        self.out.close()

    def join(self, timeout: float = 5.0) -> None:
        self.stop()
        for t in self._threads:
            t.join(timeout)
        self.source.close()

    def swap_source(self, image: np.ndarray, source_landmarks=None) -> None:
        self.commands.put(("source", image, source_landmarks))

    def reset(self) -> None:
        self.commands.put(("reset",))

    def set_light(self, direction: torch.Tensor) -> None:
        """A new relighting direction (3,) on the CPU (runtime/live/depth.py LightKeys.direction())."""
        self.commands.put(("light", direction))

    # -------------------------------------------------------------------------- threads
    def _prepare_loop(self) -> None:
        from runtime.live.capture import SourceEnded
        while not self._stop.is_set():
            try:
                frame = self.source.read(timeout=0.1)
            except SourceEnded:
                self.status = "input ended"
                self.hints.close()
                return
            if frame is None:
                continue
            self.counters.frames_in += 1
            t0 = time.perf_counter()
            hints = self.tracker(frame.rgb, frame.t_capture)
            if hints is None:
                self.counters.no_face += 1
                self.status = "no face found yet: look into the camera"
                self.last_camera = frame.rgb
                continue
            if not hints.face:
                self.counters.no_face += 1
            self.status = "ok" if hints.face else "no face: holding the last crop"
            tag = Tag(frame.index, frame.t_capture, bool(hints.face), hints.pose,
                      (time.perf_counter() - t0) * 1e3)
            self.hints.put((hints.pose, hints.local, tag))

    def _device_loop(self) -> None:
        ctx = torch.cuda.stream(self.compute) if self.cuda else _nullcontext()
        try:
            with ctx:
                while not self._stop.is_set():
                    self._apply_commands()
                    item = self.hints.get(timeout=0.05)  # raises Closed once the input has ended
                    if item is None:
                        continue
                    self._apply_commands()  # also those sent while waiting: they apply to this frame already
                    self._run_frame(*item)
        finally:
            self.out.close()  # the presenting thread's results() ends after the last frame

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "reset":
                self.session.reset()
            elif cmd[0] == "light" and self.view is not None:
                self.view.set_light(cmd[1])
            elif cmd[0] == "source":
                self.session.set_source(torch.from_numpy(np.ascontiguousarray(cmd[1])))
                if cmd[2] is not None and hasattr(self.tracker, "set_source"):
                    self.tracker.set_source(cmd[2])

    def _run_frame(self, pose: np.ndarray, local: np.ndarray, tag: Tag) -> None:
        tag.t_device = time.perf_counter()
        clock = self._clocks[tag.index % len(self._clocks)]
        clock.start()
        done = self._frames.run(self.session, pose, local, tag, clock, self._down, self.view)
        if done is not None:  # None: a stream batch filling up
            self.out.put((done[0], done[1], clock))

    # ------------------------------------------------------------------------ presenting
    def results(self, timeout: float = 0.1):
        """Yield Results as they complete (None on timeout, so the caller can refresh a UI);
        ends when the input ends or stop() is called; re-raises a stage's error."""
        while True:
            try:
                item = self.out.get(timeout)
            except Closed:
                break
            if item is None:
                if self._error is not None:
                    break
                yield None
                continue
            j, tag, clock = item
            if self.cuda:
                self._down.events[j].synchronize()
            image = self._down.bufs[j].numpy().copy()
            finite = getattr(self.session, "finite", None)
            if finite is not None and finite.poll() is not None:  # a few frames late, never a per-frame sync
                self.stop()
                raise finite.error
            yield Result(image, tag, {"prepare": tag.prep_ms, **clock.read()})
        if self._error is not None:
            raise self._error


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_every_frame(session: LiveSession, frames, hints_fn) -> list[Any]:
    """Run every frame synchronously (no threads, no drops): for fidelity checks and tests."""
    out = []
    for k, rgb in enumerate(frames):
        h = hints_fn(rgb)
        if h is None:
            continue
        res = session.step(torch.from_numpy(h.pose), torch.from_numpy(h.local), k)
        if res is not None:
            out.append((res.tag, res.image.cpu().numpy()))
    return out
