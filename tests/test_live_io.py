"""Live runtime I/O stages: frame sources, face tracking, sinks (window, file), HUD, latency log.

CPU only and small: synthetic clips of a few dozen frames, R = 128. The window test runs a real
pygame window under Xvfb (started here on a free display) and reads the screen back with xwd.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from runtime.landmarks import BlazeFaceLandmarker, default_landmarker
from runtime.live.capture import CameraLost, CameraSource, FileSource, PushSource, SourceEnded, open_source
from runtime.live.hud import draw_hud, hud_layout, hud_lines
from runtime.live.metrics import LatencyLog, StageTimer, percentile
from runtime.live.present import NullSink, OutputFrame, TeeSink, VideoFileSink, VirtualCamSink, compose
from runtime.live.tracking import FaceTracker, OneEuroFilter, local_patches
from runtime.preprocess import local_patch_hint, prepare_source, to_tensor
from runtime.video_io import read_image, read_video, write_video

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
LEVEL0, STEP = 20, 4  # synthetic clip: frame k is flat grey LEVEL0 + STEP * k


def _clip(path: Path, n: int, fps: float, size: int = 64) -> Path:
    write_video(path, (np.full((size, size, 3), LEVEL0 + STEP * k, np.uint8) for k in range(n)), fps)
    return path


def _content(frame) -> int:
    return round((float(frame.rgb.mean()) - LEVEL0) / STEP)


# ------------------------------------------------------------------------------------------- sources
def test_file_source_plays_at_its_fps_and_frames_match_their_index(tmp_path):
    fps, n = 25.0, 20
    src = FileSource(_clip(tmp_path / "c.mp4", n, fps))
    assert src.fps == pytest.approx(fps)
    got = []
    with src:
        while True:
            try:
                f = src.read(timeout=2.0)
            except SourceEnded:
                break
            assert f is not None, "no frame within 2 s from a 25 fps file"
            got.append(f)
    idx = [f.index for f in got]
    assert idx == sorted(idx) and idx[-1] == n - 1
    assert all(_content(f) == f.index for f in got)          # each frame's pixels are that frame's
    assert sum(b - a - 1 for a, b in zip(idx, idx[1:])) + idx[0] == src.dropped  # gaps == drops
    # paced by the file's rate: frame k is never captured before k / fps after the first
    assert all(f.t_capture - src.t_start >= f.index / fps for f in got)
    assert got[-1].t_capture - src.t_start >= (n - 1) / fps


def test_file_source_latest_frame_wins_when_the_reader_is_slow(tmp_path):
    fps = 50.0
    src = FileSource(_clip(tmp_path / "c.mp4", 40, fps))
    got = []
    with src:
        try:
            while True:
                time.sleep(3 / fps)                 # a reader three frames slow
                produced = src._slot._next_index    # frames captured so far
                f = src.read(timeout=2.0)
                assert f is not None
                assert f.index >= produced - 1      # the newest frame, not the oldest waiting
                assert _content(f) == f.index
                got.append(f.index)
        except SourceEnded:
            pass
    assert src.dropped > 0
    assert sum(b - a - 1 for a, b in zip(got, got[1:])) + got[0] == src.dropped


def test_file_source_end_and_loop(tmp_path):
    path = _clip(tmp_path / "c.mp4", 6, 30.0)
    with FileSource(path, realtime=False) as src:      # every frame, in order, then the end
        assert [_content(src.read(2.0)) for _ in range(6)] == list(range(6))
        with pytest.raises(SourceEnded, match="--loop"):
            src.read(2.0)
    with FileSource(path, loop=True, realtime=False) as src:
        assert [_content(src.read(2.0)) for _ in range(15)] == [k % 6 for k in range(15)]
        assert src.dropped == 0
    with pytest.raises(FileNotFoundError, match="not found"):
        FileSource(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="not both"):
        open_source(camera=0, input=path)


def test_file_source_without_pyav_uses_opencv(tmp_path, monkeypatch):
    path = _clip(tmp_path / "c.mp4", 5, 30.0)
    monkeypatch.setitem(sys.modules, "runtime.video_io", None)  # `from runtime.video_io import` fails
    with FileSource(path, realtime=False) as src:
        assert src.fps == pytest.approx(30.0)
        assert [_content(src.read(2.0)) for _ in range(5)] == list(range(5))
        with pytest.raises(SourceEnded):
            src.read(2.0)


def test_push_source_keeps_the_newest():
    src = PushSource()
    for k in range(3):
        src.push(np.full((4, 4, 3), k, np.uint8), t_capture=float(k))
    f = src.read(0.1)
    assert (f.index, f.t_capture, int(f.rgb[0, 0, 0]), src.dropped) == (2, 2.0, 2, 2)
    assert src.read(0.01) is None
    with pytest.raises(ValueError, match="uint8"):
        src.push(np.zeros((4, 4), np.uint8))
    src.close()
    with pytest.raises(SourceEnded):
        src.read(0.1)


class FakeCapture:
    """cv2.VideoCapture stand-in: `good` frames, then it fails (unplugged) or blocks (stalled driver)."""

    def __init__(self, good: int, then: str = "fail", opened: bool = True):
        self.good, self.then, self.opened, self.n = good, then, opened, 0
        self.release_event = __import__("threading").Event()
        self.released = False

    def isOpened(self):
        return self.opened

    def set(self, prop, value):
        return True

    def get(self, prop):
        return 30.0

    def read(self):
        self.n += 1
        if self.n <= self.good:
            time.sleep(0.01)
            return True, np.zeros((8, 8, 3), np.uint8)
        if self.then == "block":
            self.release_event.wait(30)
        return False, None

    def release(self):
        self.released = True


def _read_until_lost(src, limit_s: float = 15.0) -> tuple[CameraLost, float, int]:
    t0, frames = time.perf_counter(), 0
    while time.perf_counter() - t0 < limit_s:
        try:
            frames += src.read(timeout=0.1) is not None
        except CameraLost as e:
            return e, time.perf_counter() - t0, frames
    raise AssertionError(f"no CameraLost within {limit_s} s: the source hangs")


@pytest.mark.parametrize("then", ["fail", "block"])
def test_camera_lost_mid_run_is_reported_promptly(then):
    cap = FakeCapture(good=5, then=then)
    src = CameraSource(7, open_capture=lambda i: cap, lost_after=0.5)
    src.start()
    try:
        err, _, frames = _read_until_lost(src)
        assert frames >= 1 and "camera 7" in str(err) and "--camera" in str(err)
        t0 = time.perf_counter()
        src.close()
        src.close()                                  # idempotent
        assert time.perf_counter() - t0 < 5.0        # close() never hangs on a stuck driver
    finally:
        cap.release_event.set()


def test_missing_camera_fails_fast_with_a_clear_message():
    with pytest.raises(CameraLost, match="camera 3 could not be opened.*--input FILE"):
        CameraSource(3, open_capture=lambda i: FakeCapture(0, opened=False)).start()
    t0 = time.perf_counter()
    with pytest.raises(CameraLost, match="camera 63"):
        CameraSource(63, open_timeout=10.0).start()  # the real OpenCV backend, no such device
    assert time.perf_counter() - t0 < 15.0


# ------------------------------------------------------------------------------------------- tracking
def test_one_euro_matches_the_paper_formula_and_reduces_jitter():
    f = OneEuroFilter(min_cutoff=1.0, beta=0.1, d_cutoff=1.0)
    dt = 1 / 60
    alpha = lambda fc: 1 / (1 + 1 / (2 * math.pi * fc) / dt)  # noqa: E731
    assert f(np.array([0.0]), 0.0)[0] == 0.0
    dx_hat = alpha(1.0) * (10.0 / dt)
    assert f(np.array([10.0]), dt)[0] == pytest.approx(alpha(1.0 + 0.1 * dx_hat) * 10.0, rel=1e-9)

    rng = np.random.default_rng(0)
    t = np.arange(240) / 60.0
    clean = np.stack([200 + 40 * np.sin(2 * np.pi * 0.4 * t), 150 + 20 * np.cos(2 * np.pi * 0.3 * t)], 1)
    noisy = clean + rng.normal(0, 3.0, clean.shape)
    f = OneEuroFilter(min_cutoff=1.0, beta=0.02)
    out = np.stack([f(x, ti) for x, ti in zip(noisy, t)])
    jitter = lambda x: np.abs(np.diff(x[30:], 2, axis=0)).mean()  # noqa: E731  frame-to-frame shake
    rms = lambda e: np.sqrt((e[30:] ** 2).mean())  # noqa: E731
    assert jitter(out) < jitter(noisy) / 4
    assert rms(out - clean) < 0.85 * rms(noisy - clean)      # lag costs less than the noise it removes
    still = 100 + rng.normal(0, 3.0, (240, 2))               # a face held still: the noise is smoothed away
    f = OneEuroFilter(min_cutoff=1.0, beta=0.02)
    out = np.stack([f(x, ti) for x, ti in zip(still, t)])
    assert rms(out - 100) < 0.35 * rms(still - 100)


@pytest.fixture(scope="module")
def camera_clip():
    """The sample driving clip (every 3rd frame) placed in 640x480 camera frames."""
    v = read_video(SAMPLES / "driving.mp4").frames[::3]
    cam = np.full((len(v), 480, 640, 3), 40, np.uint8)
    cam[:, 112:368, 192:448] = v
    return cam


class Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def detect(self, image):
        self.calls += 1
        return self.inner.detect(image)


@pytest.mark.parametrize("name", ["default", "blazeface"])
def test_tracker_follows_the_sample_face_and_holds_without_one(camera_clip, name):
    lmk = default_landmarker(None if name == "default" else name)
    r = 128
    src, src_lm = prepare_source(read_image(SAMPLES / "source.png"), r, lmk)
    counting = Counting(lmk)
    tr = FaceTracker(r, src_lm, counting)
    assert tr(np.zeros((480, 640, 3), np.uint8), 0.0) is None          # nothing to hold yet
    hints = [tr(f, 0.1 + i / 5) for i, f in enumerate(camera_clip)]
    assert all(h is not None and h.face for h in hints)
    assert tr.last_detect_roi                                             # later frames search the ROI
    h = hints[0]
    assert h.pose.shape == h.local.shape == (r, r, 3) and h.pose.dtype == np.uint8
    # local hint = the offline function's output after x/127.5-1 (black == -1)
    np.testing.assert_array_equal(to_tensor(h.local)[0], local_patch_hint(to_tensor(h.pose)[0], h.centres))
    # re-framed: the driving face lands where the source face is
    lm0 = lmk.detect(h.pose)
    assert lm0 is not None
    assert np.abs(lm0.extent()[0] - src_lm.extent()[0]).max() < 0.1 * r
    # a frame with no face: face=False, the last good box and crop are held
    held = tr(np.zeros((480, 640, 3), np.uint8), 20.0)
    assert held is not None and not held.face
    np.testing.assert_array_equal(held.box, hints[-1].box)
    np.testing.assert_array_equal(held.centres, hints[-1].centres)
    # detect_every=3: the landmarker runs on every third frame only
    counting2 = Counting(lmk)
    tr2 = FaceTracker(r, src_lm, counting2, detect_every=3, reframe="follow")
    for i, f in enumerate(camera_clip[:9]):
        assert tr2(f, i / 15).face
    assert counting2.calls == 3


def test_yuface_call_leaves_torch_threads_alone():
    yf = pytest.importorskip("runtime.landmarks").YuFaceLandmarker
    try:
        lmk = yf()
    except ImportError:
        pytest.skip("yuface is not installed (no wheel for this Python)")
    seen, inner = [], lmk._detect

    def spy(*args):  # torch's libgomp is the global one here, and yuface's regions run in it
        seen.append(torch.get_num_threads())
        return inner(*args)

    lmk._detect = spy
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # yuface runs its OpenMP regions with 1 thread, then restores the caller's setting
        assert lmk.detect(read_image(SAMPLES / "source.png")) is not None
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


def test_local_patches_match_the_offline_hint():
    rng = np.random.default_rng(1)
    pose = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    centres = np.array([[40, 20], [22, 20], [30, 50]])
    local = local_patches(pose, centres)
    np.testing.assert_array_equal(to_tensor(local)[0], local_patch_hint(to_tensor(pose)[0], centres))
    assert (local[:10] == 0).all()


# ------------------------------------------------------------------------------------------- landmarks
def test_blazeface_fallback_finds_the_sample_face_like_yuface(monkeypatch, caplog):
    bf = BlazeFaceLandmarker()
    frames = [read_image(SAMPLES / "source.png")] + list(read_video(SAMPLES / "driving.mp4").frames[::2])
    found = [bf.detect(f) for f in frames]
    assert all(lm is not None for lm in found)
    assert all(lm.left_eye[0] > lm.right_eye[0] for lm in found)   # subject's left eye on the image right
    assert bf.detect(np.zeros((240, 320, 3), np.uint8)) is None
    try:
        from runtime.landmarks import YuFaceLandmarker
        yu = YuFaceLandmarker()
    except ImportError:
        yu = None
    if yu is not None:  # plausibility against the main landmarker on the same frames
        for f, b in zip(frames, found):
            a = yu.detect(f)
            w = a.box[2] - a.box[0]
            assert np.linalg.norm(a.left_eye - b.left_eye) < 0.12 * w
            assert np.linalg.norm(a.right_eye - b.right_eye) < 0.12 * w
            assert np.linalg.norm(a.mouth - b.mouth) < 0.15 * w
            assert np.abs(a.extent()[0] - b.extent()[0]).max() < 0.12 * w
    monkeypatch.setitem(sys.modules, "yuface", None)                 # as on Python 3.12
    with caplog.at_level("WARNING", logger="runtime.landmarks"):
        assert isinstance(default_landmarker(), BlazeFaceLandmarker)
    assert "BlazeFace" in caplog.text
    with pytest.raises(ValueError, match="yuface, blazeface"):
        default_landmarker("mediapipe")


# ------------------------------------------------------------------------------------------- sinks
def _frames(n: int, size: int = 48):
    for k in range(n):
        rgb = np.zeros((size, size, 3), np.uint8)
        rgb[:, :, 0] = 10 * k % 250
        rgb[: size // 2, :, 1] = 200
        yield OutputFrame(rgb, float(k), k, driving=np.full((size, size, 3), 90, np.uint8))


def test_video_file_sink_writes_then_renames(tmp_path):
    out = tmp_path / "out.mp4"
    sink = VideoFileSink(out, fps=20, side_by_side=True)
    for n, f in enumerate(_frames(200), 1):
        assert sink.write(f, ["hud"]) == []
        assert not out.exists()                        # only the temporary file while writing
        if sink.tmp.exists() and n >= 7:               # (the encoder buffers its first frames)
            break
    assert sink.tmp.exists() and sink.tmp.parent == out.parent
    sink.close()
    sink.close()
    v = read_video(out)
    assert v.frames.shape == (n, 48, 96, 3) and v.fps == pytest.approx(20)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    with pytest.raises(RuntimeError):
        with VideoFileSink(tmp_path / "b.mp4", fps=20) as s:
            s.write(next(_frames(1)))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # aborted: nothing left
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoFileSink(tmp_path / "nope" / "x.mp4", fps=20)


def test_video_file_sink_without_pyav_uses_opencv(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    out = tmp_path / "cv.mp4"
    with VideoFileSink(out, fps=15) as sink:
        for f in _frames(5):
            sink.write(f)
    cap = cv2.VideoCapture(str(out))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == 5


KILL_CHILD = """
import sys, time, numpy as np
from runtime.live.present import VideoFileSink, OutputFrame
sinks = [VideoFileSink(p, fps=25) for p in sys.argv[1:]]
printed = False
for k in range(100000):
    f = OutputFrame(np.full((64, 64, 3), k % 250, np.uint8), 0.0, k)
    for s in sinks:
        s.write(f)
    if k >= 10 and all(s.tmp.exists() for s in sinks) and not printed:  # x264 buffers its first frames
        printed = print("writing", flush=True) or True
    time.sleep(0.005)
"""


def test_video_file_sink_killed_mid_write_leaves_no_partial_file_under_the_name(tmp_path):
    old, new = tmp_path / "old.mp4", tmp_path / "new.mp4"
    with VideoFileSink(old, fps=25) as s:
        for f in _frames(3):
            s.write(f)
    before = old.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(old), str(new)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert old.read_bytes() == before                  # the earlier good file is untouched
    assert not new.exists()                            # no half-written file under the final name
    assert len(list(tmp_path.glob(".*.partial.mp4"))) == 2  # the child really was writing


def test_virtual_cam_reports_a_missing_backend_clearly():
    for size in ({"width": 64, "height": 64}, {}):  # opened at construction, or at the first frame
        try:
            sink = VirtualCamSink(fps=30, **size)
            sink.write(next(_frames(1, 64)))
        except RuntimeError as e:
            assert "pyvirtualcam" in str(e) or "v4l2loopback" in str(e)
        else:  # a machine with a virtual camera: it took the frame
            sink.close()


def test_null_and_tee_sinks():
    a, b = NullSink(), NullSink()
    tee = TeeSink([a, b])
    for f in _frames(3):
        assert tee.write(f) == []
    tee.close()
    assert (a.frames, b.frames) == (3, 3)


def test_hud_draws_text_on_a_dark_box():
    img = np.full((256, 512, 3), 160, np.uint8)
    lines = hud_lines(59.9, 40.1, {"track": 3.0, "model": 20.0}, 2, face=False)
    out = draw_hud(img, lines)
    assert draw_hud(img, None) is img and (img == 160).all()
    *_, (x0, y0, x1, y1), _ = hud_layout(256, 512, lines)
    box = out[y0:y1, x0:x1].max(-1)
    assert (box < 60).mean() > 0.6                     # mostly dark
    assert (box > 200).sum() > 100                     # with white text on it
    assert (out[y1 + 2:] == 160).all() and (out[:, x1 + 2:] == 160).all()  # nothing outside the box
    assert any("NO FACE" in s for s in lines)
    long = ["  ".join(f"stage{k} {k}.5" for k in range(12))]     # wider than the frame: wrapped at spaces
    scale, thick, _, _, box, wrapped = hud_layout(256, 320, long)
    assert len(wrapped) > 1 and " ".join(w.strip() for w in wrapped).split() == long[0].split()
    assert all(cv2.getTextSize(w, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] <= 320 - 2 * box[0] for w in wrapped)


# ------------------------------------------------------------------------------------------- metrics
def test_percentile_and_latency_log_match_numpy(tmp_path):
    rng = np.random.default_rng(2)
    for n in (1, 2, 7, 100):
        x = rng.gamma(2.0, 10.0, n)
        for q in (0, 1, 37.5, 50, 90, 99, 100):
            assert percentile(x.tolist(), q) == pytest.approx(np.percentile(x, q), rel=1e-12)
    assert math.isnan(percentile([], 50))

    path = tmp_path / "lat.jsonl"
    log = LatencyLog(path)
    t_cap = np.cumsum(rng.uniform(0.01, 0.02, 200))
    lat = rng.gamma(3.0, 0.01, 200)
    track = rng.uniform(1, 5, 200)
    for i in range(200):
        log.record(i, t_cap[i], t_cap[i] + lat[i], {"track": track[i]}, dropped=i // 10, face=i % 50 != 0)
        assert not path.exists()
    log.close()
    s = log.summary()
    for q in (50, 90, 99):
        assert s["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(lat * 1e3, q), rel=1e-9)
    assert s["stages_ms"]["track"]["p90"] == pytest.approx(np.percentile(track, 90), rel=1e-12)
    t_pres = t_cap + lat
    assert s["fps"] == pytest.approx(199 / (t_pres[-1] - t_pres[0]))
    assert (s["frames"], s["dropped"], s["no_face_frames"]) == (200, 19, 4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 200 and rows[5]["index"] == 5 and rows[5]["stages"]["track"] == round(track[5], 3)
    assert "p99" in log.format_summary()
    aborted = LatencyLog(tmp_path / "gone.jsonl")
    aborted.record(0, 0.0, 0.01, {}, 0, True)
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat.jsonl"]


def test_stage_timer_laps():
    timer = StageTimer()
    with timer("a"):
        time.sleep(0.01)
    with timer("a"):
        pass
    timer.add("b", 2.5)
    lap = timer.lap()
    assert lap["a"] >= 10.0 and lap["b"] == 2.5 and timer.lap() == {}


# ------------------------------------------------------------------------------------------- window
WINDOW_CHILD = """
import json, sys, time, numpy as np
from runtime.live.present import Window, OutputFrame
drv, anim, lines, n = np.load(sys.argv[1]), np.load(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
sink = Window(panel=drv.shape[0])
for k in range(n):
    sink.write(OutputFrame(anim, time.perf_counter(), k, driving=drv), lines)
    time.sleep(0.02)
print("ready", flush=True)
t0 = time.time()
while time.time() - t0 < 20:
    for a in sink.poll():
        print(a, flush=True)
        if a == "quit":
            sink.close()
            sys.exit(0)
    time.sleep(0.02)
"""


def _xwd_to_rgb(data: bytes) -> np.ndarray:
    """Decode an `xwd -root` dump (ZPixmap, 24/32 bits per pixel, TrueColor) to (H, W, 3) uint8."""
    h = np.frombuffer(data[:100], ">u4")
    header, w, hgt, order, bpp, stride, ncolors = h[0], h[4], h[5], h[7], h[11], h[12], h[19]
    masks = h[14:17]
    start = int(header) + 12 * int(ncolors)
    raw = np.frombuffer(data[start:start + int(hgt) * int(stride)], np.uint8).reshape(int(hgt), int(stride))
    px = raw[:, :int(w) * int(bpp) // 8].reshape(int(hgt), int(w), int(bpp) // 8)
    if bpp == 32:
        v = px.copy().view("<u4" if order == 0 else ">u4")[..., 0]
    else:
        v = px[..., 0].astype(np.uint32) | px[..., 1].astype(np.uint32) << 8 | px[..., 2].astype(np.uint32) << 16
    shifts = [(int(m) & -int(m)).bit_length() - 1 for m in masks]
    chans = [((v & int(m)) >> s).astype(np.uint8) for m, s in zip(masks, shifts)]
    return np.stack(chans, -1)


def screenshot(display: str) -> np.ndarray:
    data = subprocess.run(["xwd", "-root", "-silent", "-display", display], check=True,
                          capture_output=True, timeout=30).stdout
    return _xwd_to_rgb(data)


@pytest.fixture()
def xvfb():
    if not shutil.which("Xvfb"):
        pytest.skip("Xvfb is not installed (apt-get install xvfb x11-apps xdotool)")
    missing = [t for t in ("xwd", "xdotool") if not shutil.which(t)]
    assert not missing, f"{missing} not installed: apt-get install x11-apps xdotool"
    r, w = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", "1024x600x24", "-nolisten", "tcp"],
                            pass_fds=(w,), stderr=subprocess.DEVNULL)
    os.close(w)
    with os.fdopen(r) as f:
        num = f.readline().strip()
    if not num:
        proc.kill()
        pytest.fail("Xvfb did not report a display number")
    yield f":{num}"
    proc.terminate()
    proc.wait(10)


def test_window_without_a_display_says_so(monkeypatch):
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"):
        monkeypatch.delenv(var, raising=False)
    code = ("from runtime.live.present import Window\n"
            "try:\n    Window()\nexcept RuntimeError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "--headless" in out and "DISPLAY" in out


def test_window_shows_frames_with_the_hud_and_takes_keys(xvfb, tmp_path):
    panel = 192
    yy, xx = np.mgrid[0:panel, 0:panel]
    drv = np.full((panel, panel, 3), 128, np.uint8)
    anim = np.stack([xx * 255 // panel, yy * 255 // panel, np.full_like(xx, 60)], -1).astype(np.uint8)
    lines = hud_lines(30.0, 45.5, {"track": 3.2}, 1, face=True)
    np.save(tmp_path / "d.npy", drv)
    np.save(tmp_path / "a.npy", anim)
    env = dict(os.environ, DISPLAY=xvfb, SDL_VIDEO_WINDOW_POS="0,0", SDL_AUDIODRIVER="dummy")
    child = subprocess.Popen([sys.executable, "-c", WINDOW_CHILD, str(tmp_path / "d.npy"), str(tmp_path / "a.npy"),
                              json.dumps(lines), "5"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        shot = screenshot(xvfb)
        cv2.imwrite(str(tmp_path / "window.png"), shot[:, :, ::-1])
        view = shot[:panel, :2 * panel].astype(int)
        # the animated frame sits in the right half, exactly as presented
        assert np.abs(view[:, panel:] - anim).mean() < 3
        # the HUD box is where hud_layout puts it: dark, with white text, over the grey driving panel
        *_, (x0, y0, x1, y1), _ = hud_layout(panel, 2 * panel, lines)
        box = view[y0:y1, x0:x1].max(-1)
        assert (box < 60).mean() > 0.5 and (box > 200).sum() > 50
        below = view[y1 + 2:, :panel]
        assert np.abs(below - 128).max() <= 2             # the rest of the driving panel is untouched
        # no window manager: X gives the keyboard to the window under the pointer
        subprocess.run(["xdotool", "mousemove", str(panel), str(panel // 2)], env=env, check=True, timeout=10)
        subprocess.run(["xdotool", "key", "s", "r", "h", "Escape"], env=env, check=True, timeout=10)
        actions = [child.stdout.readline().strip() for _ in range(4)]
        assert actions == ["swap_source", "reset", "toggle_hud", "quit"]
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
