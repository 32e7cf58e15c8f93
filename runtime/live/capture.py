"""Frame sources for the live runtime: a camera, a video file played at its own rate, or pushed frames.

Every source hands out the newest frame only ("latest frame wins"). A grabber thread captures into
a one-frame slot; a frame that is overwritten before the reader took it is counted in `dropped`,
so a slow consumer sees fresh frames and growing latency never builds up in a queue. Each `Frame`
carries `t_capture` (time.perf_counter() when it was captured) and a sequence `index`; the gaps in
`index` are exactly the dropped frames.

    source = open_source(camera=0)            # or input="clip.mp4", loop=True; or PushSource()
    source.start()
    frame = source.read(timeout=1.0)          # Frame | None on timeout
    source.close()

Ends and failures are exceptions raised by `read`: `SourceEnded` at the end of a file (unless
looping) or after `PushSource.close()`, and `CameraLost` when a camera cannot be opened, stops
delivering frames, or stalls for `lost_after` seconds (the message names the camera and the fix).
`close()` is idempotent and bounded: a grabber stuck inside a driver call is left to finish on its
own (daemon thread) instead of hanging the caller.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Frame:
    rgb: np.ndarray   # (H, W, 3) uint8 RGB
    t_capture: float  # time.perf_counter() at capture
    index: int        # sequence number of captured frames (gaps = dropped frames)


class SourceEnded(Exception):
    """The source has no more frames (end of a file that does not loop, or a closed PushSource)."""


class CameraLost(RuntimeError):
    """A camera could not be opened or stopped delivering frames; the message says what to do."""


class FrameSource(Protocol):
    fps: float | None  # the source's nominal rate, None if unknown
    dropped: int       # frames overwritten before they were read

    def start(self) -> None: ...
    def read(self, timeout: float) -> Frame | None: ...
    def close(self) -> None: ...


class _Latest:
    """One-frame slot shared by a producer thread and the reader: the newest frame wins."""

    def __init__(self):
        self._cv = threading.Condition()
        self._frame: Frame | None = None
        self._error: BaseException | None = None
        self._next_index = 0
        self.dropped = 0
        self.t_last = time.perf_counter()  # when the last frame arrived (for stall detection)

    def put(self, rgb: np.ndarray, t_capture: float | None = None) -> None:
        with self._cv:
            if self._frame is not None:
                self.dropped += 1
            t = time.perf_counter() if t_capture is None else t_capture
            self._frame = Frame(rgb, t, self._next_index)
            self._next_index += 1
            self.t_last = time.perf_counter()
            self._cv.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cv:
            if self._error is None:
                self._error = error
            self._cv.notify_all()

    def wait_empty(self, stop: threading.Event, poll: float = 0.05) -> None:
        """Block the producer until the reader took the frame (lossless mode) or `stop` is set."""
        with self._cv:
            while self._frame is not None and not stop.is_set():
                self._cv.wait(poll)

    def take(self, timeout: float) -> Frame | None:
        """The newest unread frame; raises the producer's error once no frame is pending."""
        with self._cv:
            self._cv.wait_for(lambda: self._frame is not None or self._error is not None, timeout)
            frame, self._frame = self._frame, None
            if frame is not None:
                self._cv.notify_all()
                return frame
            if self._error is not None:
                raise self._error
            return None


class _ThreadedSource:
    """A source whose frames come from `_run` on a daemon thread."""

    name = "source"
    join_timeout = 1.0

    def __init__(self):
        self.fps: float | None = None
        self._slot = _Latest()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def dropped(self) -> int:
        return self._slot.dropped

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._thread = threading.Thread(target=self._guarded, name=f"capture:{self.name}", daemon=True)
        self._thread.start()

    def read(self, timeout: float) -> Frame | None:
        if self._thread is None:
            raise RuntimeError(f"{self.name}: call start() before read()")
        return self._slot.take(timeout)

    def close(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(self.join_timeout)
            if t.is_alive():
                log.warning("%s: the capture thread is blocked in a driver call; leaving it to exit on its own",
                            self.name)
        self._slot.fail(SourceEnded(f"{self.name} was closed"))

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
            self._slot.fail(e)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()


class CameraSource(_ThreadedSource):
    """A camera through cv2.VideoCapture (V4L2 on Linux, MSMF on Windows, AVFoundation on macOS).

    width/height/fps are requests; the driver may pick the nearest mode (`self.fps` is what it
    reports). `open_timeout` bounds how long start() waits for the device to open, `lost_after`
    how long read() tolerates no new frame before raising CameraLost. `open_capture` builds the
    capture object (cv2.VideoCapture by default; tests pass a fake).
    """

    def __init__(self, index: int = 0, width: int | None = None, height: int | None = None,
                 fps: float | None = None, open_timeout: float = 5.0, lost_after: float = 2.0,
                 open_capture: Callable[[int], object] = cv2.VideoCapture):
        super().__init__()
        self.index, self.request = index, (width, height, fps)
        self.open_timeout, self.lost_after, self._open_capture = open_timeout, lost_after, open_capture
        self.name = f"camera {index}"
        self._opened = threading.Event()
        self._cap = None

    def start(self) -> None:
        super().start()
        if not self._opened.wait(self.open_timeout):
            self.close()
            raise CameraLost(f"camera {self.index} did not open within {self.open_timeout:.0f} s: "
                             f"{self._fix()}")
        err = self._slot._error  # an open failure is reported at start, not at the first read
        if err is not None:
            self.close()
            raise err

    def read(self, timeout: float) -> Frame | None:
        frame = super().read(timeout)
        if frame is None and time.perf_counter() - self._slot.t_last > self.lost_after:
            raise CameraLost(f"camera {self.index} delivered no frame for {self.lost_after:.1f} s "
                             f"(disconnected or stalled): {self._fix()}")
        return frame

    def _fix(self) -> str:
        return (f"check that it is plugged in and not used by another program (ls /dev/video*), try another "
                f"--camera N (asked for {self.index}), or play a file with --input FILE")

    def _run(self) -> None:
        try:
            cap = self._open_capture(self.index)
            if not cap.isOpened():
                raise CameraLost(f"camera {self.index} could not be opened: {self._fix()}")
            w, h, fps = self.request
            for prop, v in ((cv2.CAP_PROP_FRAME_WIDTH, w), (cv2.CAP_PROP_FRAME_HEIGHT, h), (cv2.CAP_PROP_FPS, fps)):
                if v:
                    cap.set(prop, v)
            self.fps = float(cap.get(cv2.CAP_PROP_FPS)) or None
            self._cap = cap
        except BaseException as e:
            self._slot.fail(e)
            return
        finally:
            self._opened.set()
        self._slot.t_last = time.perf_counter()
        try:
            self._grab(cap)
        finally:
            cap.release()

    def _grab(self, cap) -> None:
        failures = 0
        while not self._stop.is_set():
            ok, bgr = cap.read()
            t = time.perf_counter()
            if not ok or bgr is None:
                failures += 1
                if failures >= 5:  # V4L2 returns False at once when the device is gone
                    raise CameraLost(f"camera {self.index} stopped delivering frames (disconnected?): "
                                     f"{self._fix()}")
                time.sleep(0.02)
                continue
            failures = 0
            self._slot.put(_bgr_to_rgb(bgr), t)


class FileSource(_ThreadedSource):
    """Plays a video file at its own frame rate (realtime=True), like a camera would deliver it.

    Frame k is captured at t_start + k / fps (a fixed schedule, so sleep jitter does not accumulate);
    a slow reader gets the newest frame and the rest count as dropped. realtime=False hands out
    every frame, as fast as the reader takes them (for offline runs and tests). Decodes with PyAV
    where it imports, else cv2.VideoCapture.
    """

    def __init__(self, path: str | Path, loop: bool = False, realtime: bool = True):
        super().__init__()
        self.path, self.loop, self.realtime = Path(path), loop, realtime
        if not self.path.is_file():
            raise FileNotFoundError(f"--input: video not found: '{self.path}'")
        self.name = f"file '{self.path.name}'"
        self.fps = _probe_fps(self.path)
        self.t_start: float | None = None  # capture time of the first frame

    def _run(self) -> None:
        period = 1.0 / self.fps
        k = 0
        while True:
            n = 0
            for rgb in _decode(self.path):
                n += 1
                if not self.realtime:
                    self._slot.wait_empty(self._stop)
                elif self.t_start is not None:
                    wait = self.t_start + k * period - time.perf_counter()
                    if wait > 0 and self._stop.wait(wait):
                        return
                if self._stop.is_set():
                    return
                t = time.perf_counter()
                if self.t_start is None:  # the clock starts at the first frame: frame k at t_start + k / fps
                    self.t_start = t
                self._slot.put(rgb, t)
                k += 1
            if n == 0:
                raise ValueError(f"{self.name} decoded to zero frames")
            if not self.loop:
                break
        if not self.realtime:
            self._slot.wait_empty(self._stop)
        self._slot.fail(SourceEnded(f"end of {self.name} ({k} frames); pass --loop to repeat it"))


class PushSource:
    """Frames pushed by the caller (library API): push() from any thread, read() in the pipeline."""

    def __init__(self, fps: float | None = None):
        self.fps = fps
        self._slot = _Latest()
        self._closed = False

    @property
    def dropped(self) -> int:
        return self._slot.dropped

    def start(self) -> None:
        pass

    def push(self, rgb: np.ndarray, t_capture: float | None = None) -> None:
        """rgb: (H, W, 3) uint8 RGB; t_capture defaults to now (time.perf_counter())."""
        if self._closed:
            raise SourceEnded("push() after close()")
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"push() expects an (H, W, 3) uint8 RGB frame, got {rgb.dtype} {rgb.shape}")
        self._slot.put(rgb, t_capture)

    def read(self, timeout: float) -> Frame | None:
        return self._slot.take(timeout)

    def close(self) -> None:
        self._closed = True
        self._slot.fail(SourceEnded("the push source was closed"))


def open_source(camera: int | None = None, input: str | Path | None = None, loop: bool = False,
                width: int | None = None, height: int | None = None, fps: float | None = None) -> FrameSource:
    """`--camera N` or `--input FILE [--loop]` (not both); neither means camera 0. Not started."""
    if camera is not None and input is not None:
        raise ValueError("pass either --camera N or --input FILE, not both")
    if input is not None:
        return FileSource(input, loop=loop)
    return CameraSource(0 if camera is None else camera, width, height, fps)


def _bgr_to_rgb(bgr: np.ndarray) -> np.ndarray:
    if bgr.ndim == 2:
        return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB if bgr.shape[2] == 4 else cv2.COLOR_BGR2RGB)


def _probe_fps(path: Path) -> float:
    try:
        from runtime.video_io import video_fps
    except ImportError:  # no PyAV (e.g. the GPU image)
        cap = cv2.VideoCapture(str(path))
        fps = float(cap.get(cv2.CAP_PROP_FPS)) if cap.isOpened() else 0.0
        cap.release()
        return fps if 0 < fps < 1000 else 25.0
    return video_fps(path)


def _decode(path: Path) -> Iterator[np.ndarray]:
    try:
        from runtime.video_io import iter_video
    except ImportError:
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise ValueError(f"OpenCV could not open '{path}' (and PyAV is not installed)")
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    return
                yield _bgr_to_rgb(bgr)
        finally:
            cap.release()
    else:
        yield from iter_video(path)
