"""The browser client in a real browser: Debian's Chromium driven by Playwright, a fake camera fed
from samples/driving.mp4 (as a .y4m written here), against `python -m runtime.web` (the tiny
preset on the CPU, 1 step, window 3).

Needs `apt-get install -y chromium` and `pip install playwright` (its driver ships in the wheel;
no browser is downloaded). Skips, saying so, when either is missing, except under CI=true, where
their absence is an error. Saves a screenshot of the page to .readme_parts/web.png.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("XPORTRAIT_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = ROOT / ".readme_parts" / "web.png"

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the skip below says what to install
    sync_playwright = None

MISSING = [what for what, ok in (
    (f"Debian's Chromium at {CHROMIUM} (apt-get install -y chromium)", Path(CHROMIUM).exists()),
    ("the playwright wheel (pip install playwright==1.65.2; never `playwright install`)", sync_playwright is not None),
) if not ok]
if MISSING and os.environ.get("CI") == "true":  # the browser test is the acceptance test: CI must run it
    raise RuntimeError("CI needs " + " and ".join(MISSING))
pytestmark = pytest.mark.skipif(bool(MISSING), reason="needs " + " and ".join(MISSING))


def write_y4m(frames: np.ndarray, fps: int, path: Path) -> Path:
    """(N, H, W, 3) uint8 RGB -> a YUV4MPEG2 4:2:0 file, the format Chromium's fake camera reads."""
    import cv2
    n, h, w, _ = frames.shape
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            f.write(b"FRAME\n")
            f.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes())  # Y plane, then U, then V
    return path


def _stats(base: str) -> dict:
    with urllib.request.urlopen(base + "api/stats", timeout=10) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("web") / "server.log"
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "runtime.web", "--steps", "1", "--window", "3", "--port", "0",
           "--max-sessions", "3", "--detect-every", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base, deadline = None, time.monotonic() + 240
    while base is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        for line in log_path.read_text().splitlines():
            if line.startswith("serving on "):
                base = line.split()[2]
    if base is None:
        proc.kill()
        pytest.fail(f"the server did not start:\n{log_path.read_text()}")
    yield base
    proc.terminate()
    try:
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from runtime.video_io import read_video
    folder = tmp_path_factory.mktemp("camera")
    video = read_video(ROOT / "samples" / "driving.mp4")
    y4m = write_y4m(video.frames, round(video.fps), folder / "driving.y4m")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync", "--disable-quic", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={y4m}"]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


def _count(page, element_id: str) -> int:
    return int(page.inner_text(f"#{element_id}") or 0)


def _wait_frames(page, n: int, timeout_ms: int = 120_000) -> None:
    page.wait_for_function(f"() => Number(document.getElementById('frames-received').textContent) >= {n}",
                           timeout=timeout_ms)


def test_page_round_trip_latency_upload_reset(server, browser):
    """The page loads, asks for the camera, frames come back, the HUD shows a latency, a source
    upload and a reset are answered; the screenshot is saved."""
    context = browser.new_context(viewport={"width": 900, "height": 660})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server)
    page.wait_for_function("() => document.getElementById('session-id').textContent.length > 0", timeout=30_000)
    _wait_frames(page, 3)
    latency = page.inner_text("#hud-latency")
    ms = float(latency.split()[1])
    assert 0 < ms < 120_000, latency
    assert "FPS" in page.inner_text("#hud-fps")
    # the output canvas shows a picture (random weights: noise, so it varies)
    spread = page.evaluate("""() => { const c = document.getElementById('output');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lo = 255, hi = 0;
        for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
        return hi - lo; }""")
    assert spread > 10, f"the animated canvas is flat (spread {spread})"

    page.set_input_files("#source-file", str(ROOT / "samples" / "source.png"))
    page.wait_for_function("() => document.getElementById('source-status').textContent.length > 0 && "
                           "document.getElementById('source-status').textContent !== 'uploading…'", timeout=60_000)
    assert page.inner_text("#source-status") == "source updated"
    page.click("#reset")
    page.wait_for_function("() => document.getElementById('config-status').textContent.includes('reset')",
                           timeout=60_000)
    before = _count(page, "frames-received")
    _wait_frames(page, before + 2)  # frames keep coming after the new source and the reset

    SCREENSHOT.parent.mkdir(exist_ok=True)
    tmp = SCREENSHOT.with_suffix(".tmp.png")
    page.screenshot(path=str(tmp))
    os.replace(tmp, SCREENSHOT)
    assert not errors, errors
    context.close()


def test_second_tab_gets_its_own_session_and_closing_frees_it(server, browser):
    context = browser.new_context()
    first, second = context.new_page(), context.new_page()
    first.goto(server)
    _wait_frames(first, 2)
    second.goto(server)
    _wait_frames(second, 2)
    ids = first.inner_text("#session-id"), second.inner_text("#session-id")
    assert ids[0] and ids[1] and ids[0] != ids[1], ids
    n_first = _count(first, "frames-received")
    _wait_frames(first, n_first + 2)  # both tabs are served, each gets only its own frames
    assert _count(first, "stray-frames") == 0 and _count(second, "stray-frames") == 0
    stats = _stats(server)
    assert {d["id"] for d in stats["detail"]} >= set(ids), stats
    assert all(d["frames_out"] > 0 for d in stats["detail"] if d["id"] in ids), stats

    second.close()
    deadline = time.monotonic() + 20
    while ids[1] in {d["id"] for d in _stats(server)["detail"]} and time.monotonic() < deadline:
        time.sleep(0.2)
    live = {d["id"] for d in _stats(server)["detail"]}
    assert ids[1] not in live, f"closing the tab did not free its session: {live}"
    assert ids[0] in live
    context.close()
