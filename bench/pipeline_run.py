"""Capture -> presented latency through the real threaded live pipeline (runtime/live/pipeline.py).

A synthetic camera pushes the shipped driving clip (samples/driving.mp4, looped) into a PushSource at
a fixed rate, each frame stamped with its capture time; the pipeline tracks the face (its own
"track" stage), uploads, runs the session and downloads, exactly as `python -m runtime.webcam` does;
this module plays the presenting thread and records when each frame is ready to show. Dropped frames
are the pipeline's latest-frame-wins drops, counted, never queued.

Face tracking uses the project's landmarker (yuface, or the BlazeFace fallback). Where neither is
installed (e.g. a GPU image without the wheels), a resize-only tracker stands in and the result says
that face tracking was not measured.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SOURCE = ROOT / "samples" / "source.png"
SAMPLE_DRIVING = ROOT / "samples" / "driving.mp4"


@dataclass(frozen=True)
class PipelineSpec:
    frames: int = 30          # presented frames measured (after warm-up)
    warmup: int = 3           # presented frames discarded first (graph capture, autotuning)
    source_fps: float = 60.0  # synthetic camera rate
    timeout_s: float = 120.0  # give up (and say so) if the frames have not come by then


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"could not read the image '{path}'")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def driving_frames(path: Path = SAMPLE_DRIVING, limit: int = 90) -> list[np.ndarray]:
    """Decoded frames of a clip (PyAV where installed, else OpenCV), through the live FileSource."""
    from runtime.live.capture import FileSource, SourceEnded
    src = FileSource(path, realtime=False)
    frames: list[np.ndarray] = []
    src.start()
    try:
        while len(frames) < limit:
            try:
                f = src.read(timeout=5.0)
            except SourceEnded:
                break
            if f is None:
                raise TimeoutError(f"decoding {path} stalled")
            frames.append(f.rgb)
    finally:
        src.close()
    if not frames:
        raise ValueError(f"{path} has no frames")
    return frames


class ResizeTracker:
    """Stand-in when no landmarker is installed: the frame stretched to R x R, fixed patch centres."""

    def __init__(self, size: int):
        from runtime.live.tracking import stretch_affine
        self.size = size
        self.centres = (np.array([[0.35, 0.42], [0.65, 0.42], [0.5, 0.72]]) * size).astype(int)
        self._affine = lambda w, h: stretch_affine(w, h, size)

    def __call__(self, rgb: np.ndarray, t: float):
        from runtime.live.tracking import Hints, local_patches
        pose = cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return Hints(pose, local_patches(pose, self.centres), True, None,
                     self._affine(rgb.shape[1], rgb.shape[0]), self.centres)


def make_tracking(size: int):
    """(source image (R, R, 3) uint8, a tracker factory, description) for the sample portrait."""
    from runtime.landmarks import default_landmarker
    from runtime.live.tracking import FaceTracker
    from runtime.preprocess import prepare_source
    rgb = read_rgb(SAMPLE_SOURCE)
    try:
        landmarker = default_landmarker()
        image, lm = prepare_source(rgb, size, landmarker)
    except (ImportError, ValueError, RuntimeError, cv2.error) as e:  # no landmarker here, or it failed
        image = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        why = (str(e).splitlines() or [type(e).__name__])[0]
        return image, lambda: ResizeTracker(size), f"resize only, face tracking NOT measured ({why})"
    return image, lambda: FaceTracker(size, lm, landmarker=landmarker), type(landmarker).__name__


class _Camera:
    """Pushes `frames` (looped) into a PushSource at `fps`, on a fixed schedule, until stopped."""

    def __init__(self, source, frames: list[np.ndarray], fps: float):
        self.source, self.frames, self.period = source, frames, 1.0 / fps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-camera", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from runtime.live.capture import SourceEnded
        t0, k = time.perf_counter(), 0
        while not self._stop.is_set():
            wait = t0 + k * self.period - time.perf_counter()
            if wait > 0 and self._stop.wait(wait):
                return
            try:
                self.source.push(self.frames[k % len(self.frames)], time.perf_counter())
            except SourceEnded:
                return
            k += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def run_pipeline(session, frames: list[np.ndarray], tracker, spec: PipelineSpec, progress=None) -> dict:
    """Run the threaded pipeline until spec.warmup + spec.frames frames are presented; per-frame records."""
    from runtime.live.capture import PushSource
    from runtime.live.pipeline import Pipeline
    source = PushSource(fps=spec.source_fps)
    pipe = Pipeline(session, source, tracker)
    camera = _Camera(source, frames, spec.source_fps)
    records: list[tuple[float, float, dict]] = []  # (t_present, latency ms, stages ms)
    seen = 0
    t_start = time.perf_counter()
    pipe.start()
    camera.start()
    try:
        for res in pipe.results(timeout=0.1):
            now = time.perf_counter()
            if res is None:
                if now - t_start > spec.timeout_s:
                    break
                continue
            seen += 1
            if seen <= spec.warmup:
                continue
            stages = {("track" if k == "prepare" else k): v for k, v in res.stages.items()}
            records.append((now, (now - res.tag.t_capture) * 1e3, stages))
            if progress is not None:
                progress(1)
            if len(records) >= spec.frames or now - t_start > spec.timeout_s:
                break
    finally:
        camera.stop()
        pipe.join()
    dropped = source.dropped + pipe.hints.dropped + pipe.out.dropped
    return {"records": records, "dropped": dropped, "frames_in": pipe.counters.frames_in,
            "no_face": pipe.counters.no_face, "timed_out": len(records) < spec.frames,
            "source_fps": spec.source_fps}
