"""Where animated frames go: a window, a video file, a virtual camera, or nowhere (headless).

Every sink has one interface:

    actions = sink.write(OutputFrame(rgb, t_capture, index, driving, face), hud_lines)  # -> list[str]
    actions = sink.poll()     # user actions without a new frame (keeps a window responsive)
    sink.close()              # idempotent

Actions come from keys where there is a keyboard: "swap_source" (s), "reset" (r, the temporal
cache), "toggle_hud" (h; the caller then passes hud_lines=None), "quit" (q, Esc, or closing the
window), and "light_left/right/up/down" (arrow keys or j/l/i/k: move the relighting light,
runtime/live/depth.py). Sinks draw what they are given and keep no queue: a frame is shown or
encoded in write(). An animated frame may be several panels wide (rgbd: RGB | depth).

* Window: a pygame window (opencv-python-headless has no GUI), driving | animated side by
  side, each panel scaled to `panel` px, HUD on top.
* VideoFileSink: mp4 written to a temporary name in the target folder and renamed on close, so
  the final name only ever holds a complete file (an aborted or killed run leaves an earlier file
  untouched). PyAV (H.264) where it imports, else cv2.VideoWriter (MPEG-4 part 2, "mp4v").
* VirtualCamSink: pyvirtualcam (v4l2loopback on Linux, OBS on Windows/macOS).
* NullSink: discards frames (servers, tests, benchmarks).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from runtime.live.hud import draw_hud

log = logging.getLogger(__name__)

ACTIONS = ("swap_source", "reset", "toggle_hud", "quit", "light_left", "light_right", "light_up", "light_down")
# pygame key names (pygame.K_<name>) -> action
KEYS = {"s": "swap_source", "r": "reset", "h": "toggle_hud", "q": "quit", "ESCAPE": "quit",
        "LEFT": "light_left", "j": "light_left", "RIGHT": "light_right", "l": "light_right",
        "UP": "light_up", "i": "light_up", "DOWN": "light_down", "k": "light_down"}


@dataclass
class OutputFrame:
    rgb: np.ndarray                # (H, W, 3) uint8 animated frame (rgbd: W = 2H, RGB | depth)
    t_capture: float               # capture time of its driving frame (perf_counter)
    index: int                     # the driving frame's sequence number
    driving: np.ndarray | None = None  # (R, R, 3) uint8 re-framed driving frame, for side by side
    face: bool = True


class Sink(Protocol):
    def write(self, out: OutputFrame, hud_lines: list[str] | None = None) -> list[str]: ...
    def poll(self) -> list[str]: ...
    def close(self) -> None: ...


def compose(out: OutputFrame, panel: int | None = None, side_by_side: bool = True) -> np.ndarray:
    """driving | animated (or the animated frame alone), each resized to `panel` px high if given
    (keeping its aspect: a 2-panel-wide rgbd frame stays twice as wide)."""
    panels = [out.driving, out.rgb] if side_by_side and out.driving is not None else [out.rgb]
    if panel is not None:
        panels = [p if p.shape[0] == panel else cv2.resize(
            p, (round(p.shape[1] * panel / p.shape[0]), panel),
            interpolation=cv2.INTER_AREA if p.shape[0] > panel else cv2.INTER_LINEAR) for p in panels]
    elif len(panels) == 2 and panels[0].shape[0] != panels[1].shape[0]:
        h = panels[1].shape[0]
        panels[0] = cv2.resize(panels[0], (round(panels[0].shape[1] * h / panels[0].shape[0]), h))
    return np.ascontiguousarray(np.concatenate(panels, axis=1))


class NullSink:
    """Discards frames; counts them."""

    def __init__(self):
        self.frames = 0

    def write(self, out: OutputFrame, hud_lines: list[str] | None = None) -> list[str]:
        self.frames += 1
        return []

    def poll(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class Window:
    """A pygame window showing driving | animated with the HUD. Needs a display (X11/Wayland)."""

    def __init__(self, title: str = "xportrait-live", panel: int = 512, side_by_side: bool = True):
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        try:
            import pygame
        except ImportError as e:
            raise RuntimeError("the window needs pygame: pip install pygame==2.6.1 (or run with --headless "
                               "or --output OUT.mp4)") from e
        self._pg, self.title, self.panel, self.side_by_side = pygame, title, panel, side_by_side
        fix = "set DISPLAY to a running X server (or WAYLAND_DISPLAY), or run with --headless or --output OUT.mp4"
        try:
            pygame.display.init()
        except pygame.error as e:
            raise RuntimeError(f"cannot open a window ({e}): {fix}") from e
        driver = pygame.display.get_driver()
        if driver in ("offscreen", "dummy") and not os.environ.get("SDL_VIDEODRIVER"):
            pygame.display.quit()  # SDL fell back to drawing nowhere: say so instead of showing nothing
            raise RuntimeError(f"no display to open a window on (SDL video driver '{driver}'): {fix}")
        self._screen = None
        self._keys = {getattr(pygame, f"K_{name}"): action for name, action in KEYS.items()}
        self._closed = False

    def write(self, out: OutputFrame, hud_lines: list[str] | None = None) -> list[str]:
        if self._closed:
            return ["quit"]
        pg = self._pg
        view = draw_hud(compose(out, self.panel, self.side_by_side), hud_lines)
        h, w = view.shape[:2]
        if self._screen is None or self._screen.get_size() != (w, h):
            self._screen = pg.display.set_mode((w, h))
            pg.display.set_caption(self.title)
        self._screen.blit(pg.image.frombuffer(view.tobytes(), (w, h), "RGB"), (0, 0))
        pg.display.flip()
        return self.poll()

    def poll(self) -> list[str]:
        if self._closed:
            return ["quit"]
        pg, actions = self._pg, []
        for ev in pg.event.get():
            if ev.type == pg.QUIT:
                actions.append("quit")
            elif ev.type == pg.KEYDOWN and ev.key in self._keys:
                actions.append(self._keys[ev.key])
        return actions

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pg.display.quit()


class VideoFileSink:
    """Writes the animated frames (or driving | animated) to a video file, atomically.

    The file is encoded under a temporary name beside `path` and renamed on close(); abort() (or
    leaving a `with` block by an exception) deletes it instead. `hud=True` burns the HUD in.
    """

    def __init__(self, path: str | Path, fps: float, side_by_side: bool = False, hud: bool = False,
                 crf: int = 18):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"--output: folder '{self.path.parent}' does not exist")
        if self.path.suffix.lower() not in (".mp4", ".mkv", ".mov", ".avi"):
            raise ValueError(f"--output '{self.path}': use a .mp4, .mkv, .mov or .avi file name")
        if not fps or fps <= 0:
            raise ValueError(f"VideoFileSink: fps must be > 0, got {fps}")
        self.fps, self.side_by_side, self.hud, self.crf = fps, side_by_side, hud, crf
        self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.partial{self.path.suffix}")
        self.frames = 0
        self._writer = None  # _AvWriter or _CvWriter, opened at the first frame (size)
        self._done = False

    def write(self, out: OutputFrame, hud_lines: list[str] | None = None) -> list[str]:
        if self._done:
            raise RuntimeError(f"VideoFileSink '{self.path}' is already closed")
        view = compose(out, None, self.side_by_side)
        if self.hud:
            view = draw_hud(view, hud_lines)
        if self._writer is None:
            self._writer = _open_writer(self.tmp, self.fps, view.shape[1], view.shape[0], self.crf)
        self._writer.write(view)
        self.frames += 1
        return []

    def poll(self) -> list[str]:
        return []

    def close(self) -> None:
        """Finish the file and rename it to `path` (no file if no frame was written)."""
        if self._done:
            return
        self._done = True
        if self._writer is None:
            log.warning("--output %s: no frame was written, so no file was made", self.path)
            return
        try:
            self._writer.close()
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Stop and delete the partial file; `path` is left as it was."""
        if self._done:
            return
        self._done = True
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.abort() if exc_type is not None else self.close()


def _open_writer(path: Path, fps: float, width: int, height: int, crf: int):
    try:
        import av  # noqa: F401
    except ImportError:
        return _CvWriter(path, fps, width, height)
    return _AvWriter(path, fps, width, height, crf)


class _AvWriter:
    """H.264 yuv420p via PyAV; odd sizes padded by repeating the last row/column."""

    def __init__(self, path: Path, fps: float, width: int, height: int, crf: int):
        import av
        self._av, self.size = av, (height, width)
        self._c = av.open(str(path), mode="w")
        self._s = self._c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self._s.width, self._s.height = width + width % 2, height + height % 2
        self._s.pix_fmt = "yuv420p"
        self._s.options = {"crf": str(crf), "preset": "veryfast"}

    def write(self, rgb: np.ndarray) -> None:
        _check_size(rgb, self.size)
        h, w = self.size
        if h % 2 or w % 2:
            rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        self._c.mux(self._s.encode(self._av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))

    def close(self) -> None:
        try:
            self._c.mux(self._s.encode(None))
        finally:
            self._c.close()


class _CvWriter:
    """MPEG-4 part 2 ("mp4v") through cv2.VideoWriter, for machines without PyAV."""

    def __init__(self, path: Path, fps: float, width: int, height: int):
        self.size = (height, width)
        self._w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not self._w.isOpened():
            raise RuntimeError(f"OpenCV could not open a video writer for '{path}' (mp4v); install PyAV (av)")

    def write(self, rgb: np.ndarray) -> None:
        _check_size(rgb, self.size)
        self._w.write(np.ascontiguousarray(rgb[:, :, ::-1]))

    def close(self) -> None:
        self._w.release()


def _check_size(rgb: np.ndarray, size: tuple[int, int]) -> None:
    if rgb.shape[:2] != size:
        raise ValueError(f"frame is {rgb.shape[1]}x{rgb.shape[0]}, the video is {size[1]}x{size[0]}")


class VirtualCamSink:
    """Sends the animated frames to a virtual camera (pyvirtualcam) that video-call apps can pick.

    Linux needs the v4l2loopback kernel module (`sudo modprobe v4l2loopback exclusive_caps=1`);
    Windows and macOS need OBS's virtual camera installed. With width and height the camera opens
    at construction, so a missing backend is reported before the model loads; without them it
    opens at the first frame, at that frame's size.
    """

    def __init__(self, fps: float = 30.0, width: int | None = None, height: int | None = None,
                 device: str | None = None):
        try:
            import pyvirtualcam
        except ImportError as e:
            raise RuntimeError("--virtual-cam needs pyvirtualcam: pip install pyvirtualcam==0.15.0") from e
        self._pvc, self.fps, self.device = pyvirtualcam, fps, device
        self._cam, self.size, self._closed = None, None, False
        if width and height:
            self._open(width, height)

    def _open(self, width: int, height: int) -> None:
        try:
            self._cam = self._pvc.Camera(width=width, height=height, fps=self.fps, device=self.device)
        except Exception as e:  # pyvirtualcam raises RuntimeError/ValueError with the backend's reason
            raise RuntimeError(f"no virtual camera available ({e}): on Linux load v4l2loopback "
                               "(sudo modprobe v4l2loopback exclusive_caps=1); on Windows/macOS install "
                               "OBS Studio and start its virtual camera once") from e
        self.size = (height, width)

    def write(self, out: OutputFrame, hud_lines: list[str] | None = None) -> list[str]:
        rgb = out.rgb
        if self._cam is None:
            self._open(rgb.shape[1], rgb.shape[0])
        if rgb.shape[:2] != self.size:
            rgb = cv2.resize(rgb, (self.size[1], self.size[0]), interpolation=cv2.INTER_LINEAR)
        self._cam.send(np.ascontiguousarray(rgb))
        return []

    def poll(self) -> list[str]:
        return []

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._cam is not None:
                self._cam.close()


class TeeSink:
    """Several sinks as one: writes to each and returns the union of their actions in order."""

    def __init__(self, sinks: list):
        self.sinks = list(sinks)

    def write(self, out: OutputFrame, hud_lines: list[str] | None = None) -> list[str]:
        return [a for s in self.sinks for a in s.write(out, hud_lines)]

    def poll(self) -> list[str]:
        return [a for s in self.sinks for a in s.poll()]

    def close(self) -> None:
        errors = []
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:  # close every sink, then report the first failure
                errors.append(e)
        if errors:
            raise errors[0]
