"""Per-frame latency log and its summary: capture -> presented, per-stage times, drops.

    log = LatencyLog("run.jsonl")             # or LatencyLog(None) to keep only the summary
    timer = StageTimer()
    with timer("track"): ...
    log.record(frame.index, frame.t_capture, time.perf_counter(), timer.lap(), source.dropped, face)
    log.close()                               # the JSON-lines file appears under its name only now
    print(log.format_summary())

Each JSON line: {"index", "t_capture", "t_present" (perf_counter seconds), "latency_ms",
"stages": {name: ms}, "dropped" (the source's running count), "face"}. Percentiles use linear
interpolation between order statistics (numpy's default "linear" method).
"""
from __future__ import annotations

import json
import math
import os
import time
from array import array
from collections.abc import Sequence
from pathlib import Path


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation between the closest ranks; nan if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside 0..100")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class StageTimer:
    """Wall-clock (perf_counter) milliseconds of named CPU stages of one frame.

    For GPU stages, time with CUDA events off the hot path instead: perf_counter around an
    asynchronous launch measures only the launch.
    """

    def __init__(self):
        self.stages: dict[str, float] = {}

    def __call__(self, name: str) -> "_Stage":
        return _Stage(self, name)

    def add(self, name: str, ms: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + ms

    def lap(self) -> dict[str, float]:
        """The stages timed since the last lap, and start a new frame."""
        out, self.stages = self.stages, {}
        return out


class _Stage:
    def __init__(self, timer: StageTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timer.add(self.name, (time.perf_counter() - self.t0) * 1e3)


class LatencyLog:
    """Records one entry per presented frame; optionally streams them as JSON lines to `path`.

    The file is written under a temporary name in the same folder and renamed on close(), so
    `path` only ever holds a complete log. Values are kept in compact arrays for the summary.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self._tmp = None
        self._file = None
        if self.path is not None:
            if not self.path.parent.is_dir():
                raise FileNotFoundError(f"--log-json: folder '{self.path.parent}' does not exist")
            self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            self._file = open(self._tmp, "w", encoding="utf-8")
        self._latency, self._t_present = array("d"), array("d")
        self._stages: dict[str, array] = {}
        self.frames = self.no_face = 0
        self.dropped = 0

    def record(self, index: int, t_capture: float, t_present: float, stages: dict[str, float],
               dropped: int, face: bool) -> None:
        latency = (t_present - t_capture) * 1e3
        self.frames += 1
        self.no_face += not face
        self.dropped = dropped
        self._latency.append(latency)
        self._t_present.append(t_present)
        for name, ms in stages.items():
            self._stages.setdefault(name, array("d")).append(ms)
        if self._file is not None:
            self._file.write(json.dumps({
                "index": index, "t_capture": t_capture, "t_present": t_present,
                "latency_ms": round(latency, 3), "stages": {k: round(v, 3) for k, v in stages.items()},
                "dropped": dropped, "face": bool(face)}) + "\n")
            self._file.flush()  # a line per frame on disk (the temp file), so a crash keeps the record so far

    def summary(self) -> dict:
        lat = self._latency
        span = self._t_present[-1] - self._t_present[0] if self.frames > 1 else 0.0
        return {
            "frames": self.frames,
            "dropped": self.dropped,
            "no_face_frames": self.no_face,
            "fps": (self.frames - 1) / span if span > 0 else math.nan,
            "latency_ms": {f"p{q}": percentile(lat, q) for q in (50, 90, 99)} | {
                "max": max(lat) if lat else math.nan},
            "stages_ms": {name: {"p50": percentile(v, 50), "p90": percentile(v, 90)}
                          for name, v in self._stages.items()},
        }

    def format_summary(self) -> str:
        s = self.summary()
        lat = s["latency_ms"]
        lines = [f"{s['frames']} frames at {s['fps']:.1f} fps, {s['dropped']} dropped, "
                 f"{s['no_face_frames']} without a face",
                 f"latency capture->presented: p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, "
                 f"p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms"]
        for name, v in s["stages_ms"].items():
            lines.append(f"  {name:<10} p50 {v['p50']:7.2f} ms   p90 {v['p90']:7.2f} ms")
        return "\n".join(lines)

    def close(self) -> None:
        """Finish the file and move it to its name (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial file (the final name is left untouched)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close()
