"""The threaded live loop (runtime/live/pipeline.py) and `python -m runtime.webcam`, on the CPU.

* latest frame wins: with a device stage slower than the camera, stale frames are dropped and
  counted, presented frames keep increasing, and latency does not grow with run time;
* a camera lost mid-run ends the loop with the camera's error, promptly, with no hang;
* the CLI renders a file headless into an mp4 with a per-frame latency log whose timestamps are the
  driving frames' capture times; a missing camera is a one-line error.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.live.capture import CameraLost, PushSource
from runtime.live.pipeline import Pipeline
from runtime.live.session import Output

ROOT = Path(__file__).resolve().parents[1]
R = 64


class SlowSession:
    """Stands in for LiveSession: a fixed device time per frame; echoes the pose as the image."""

    def __init__(self, seconds: float):
        self.seconds, self.device, self.size, self.calls = seconds, torch.device("cpu"), R, 0

    def step(self, pose, local, tag=None, clock=None):
        time.sleep(self.seconds)
        self.calls += 1
        return Output(pose.clone(), tag)

    def set_source(self, image):
        pass

    def reset(self):
        pass


class Hints:
    def __init__(self, rgb):
        self.pose, self.local, self.face, self.box = rgb, np.zeros_like(rgb), True, None


def tracker(rgb, t):
    return Hints(rgb[:R, :R].copy())


def _frame(k: int) -> np.ndarray:
    f = np.zeros((R, R, 3), np.uint8)
    f[..., 0] = k % 256
    f[..., 1] = k // 256
    return f


def _pusher(src: PushSource, fps: float, seconds: float, stop: threading.Event) -> threading.Thread:
    def run():
        k, t0 = 0, time.perf_counter()
        while not stop.is_set() and time.perf_counter() - t0 < seconds:
            src.push(_frame(k))
            k += 1
            time.sleep(max(0.0, t0 + k / fps - time.perf_counter()))
        src.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_latest_frame_wins_and_latency_stays_bounded():
    session = SlowSession(0.04)  # 25 FPS device stage under a 100 FPS camera
    src = PushSource(fps=100)
    pipe = Pipeline(session, src, tracker).start()
    stop = threading.Event()
    _pusher(src, 100, 3.0, stop)
    latencies, indices = [], []
    for res in pipe.results(timeout=0.2):
        if res is None:
            continue
        latencies.append(time.perf_counter() - res.tag.t_capture)
        indices.append(int(res.image[0, 0, 0]) + 256 * int(res.image[0, 0, 1]))
    pipe.join()
    stop.set()
    assert len(latencies) > 20
    assert indices == sorted(indices) and len(set(indices)) == len(indices), "frames come out in order, once"
    dropped = pipe.hints.dropped + src.dropped
    assert dropped > len(latencies), f"a 4x slower stage must drop most frames (dropped {dropped})"
    half = len(latencies) // 2
    first, second = np.median(latencies[:half]), np.median(latencies[half:])
    # a growing queue would make the second half ~1.5 s slower; latest-wins keeps it flat
    assert second <= 2 * first + session.seconds, (first, second)


class LosingCamera:
    """A FrameSource whose camera disconnects after a few frames."""

    def __init__(self, frames: int):
        self.frames, self.k, self.fps, self.dropped = frames, 0, 30.0, 0

    def start(self):
        pass

    def read(self, timeout):
        from runtime.live.capture import Frame
        if self.k >= self.frames:
            raise CameraLost("camera 0 stopped delivering frames (unplugged?): reconnect it and restart")
        self.k += 1
        time.sleep(0.01)
        return Frame(_frame(self.k), time.perf_counter(), self.k)

    def close(self):
        pass


def test_camera_lost_mid_run_ends_cleanly():
    pipe = Pipeline(SlowSession(0.0), LosingCamera(5), tracker).start()
    t0 = time.perf_counter()
    got = 0
    with pytest.raises(CameraLost, match="reconnect"):
        for res in pipe.results(timeout=0.1):
            got += res is not None
    pipe.join()
    assert time.perf_counter() - t0 < 10, "no hang"
    assert all(not t.is_alive() for t in pipe._threads)


def _webcam(*args, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "runtime.webcam", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_webcam_headless_file_run(tmp_path):
    out, log = tmp_path / "new" / "out.mp4", tmp_path / "lat.jsonl"  # the output folder is made
    r = _webcam("--input", "samples/driving.mp4", "--output", str(out), "--headless", "--every-frame",
                "--frames", "6", "--steps", "1", "--window", "3", "--log-json", str(log))
    assert r.returncode == 0, r.stderr
    assert "RANDOM WEIGHTS" in r.stderr
    assert out.is_file() and out.stat().st_size > 0
    assert not [f for f in tmp_path.rglob("*") if f.name.startswith(".")], "no temporary file left"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 6
    assert [r["index"] for r in rows] == sorted(r["index"] for r in rows)
    for row in rows:
        assert row["t_present"] >= row["t_capture"] and row["latency_ms"] > 0
    from runtime.video_io import read_video
    video = read_video(out)
    assert len(video.frames) == 6
    assert "p50" in r.stderr and "latency" in r.stderr


def test_webcam_missing_camera_is_one_line_error():
    r = _webcam("--camera", "97", "--headless", "--frames", "1", timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "camera 97" in r.stderr.lower() or "camera" in r.stderr.lower()
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


def test_webcam_bad_flags_fail_before_loading():
    r = _webcam("--steps", "0", "--headless", timeout=120)
    assert r.returncode != 0 and "--steps" in r.stderr and "Traceback" not in r.stderr
    r = _webcam("--input", "samples/driving.mp4", "--output", "samples/driving.mp4", "--headless", timeout=120)
    assert r.returncode != 0 and "--output" in r.stderr


def test_webcam_sigterm_finishes_the_recording(tmp_path):
    """SIGTERM (or Ctrl-C) ends a live run like q: the recording so far is complete and playable."""
    import signal
    out, log = tmp_path / "rec.mp4", tmp_path / "lat.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "runtime.webcam", "--input", "samples/driving.mp4", "--loop",
                          "--headless", "--output", str(out), "--log-json", str(log), "--steps", "1",
                          "--window", "3"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and p.poll() is None:
            tmp_logs = list(tmp_path.glob(".lat.jsonl*"))
            if tmp_logs and len(tmp_logs[0].read_text().splitlines()) >= 3:
                break
            time.sleep(0.5)
        assert p.poll() is None, p.stderr.read()
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=120)[1]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "interrupted" in err and "Traceback" not in err
    from runtime.video_io import read_video
    n = len(log.read_text().splitlines())
    assert n >= 3 and len(read_video(out).frames) == n
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")], "no temporary file left"
