"""The web server without a browser: image checks, the message format, the session manager
(limits, latest-frame-wins, round-robin fairness, idle timeout, commands) and hostile clients
(path traversal, wrong Origin, missing token, oversized and malformed frames and uploads, message
floods, too many sessions). A fake model (tens of ms per frame) keeps these fast; one test runs
the real tiny model. The page itself is tested in Chromium by tests/test_web_browser.py.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import cv2
import numpy as np
import pytest
import torch

from runtime.live.config import LiveConfig
from runtime.live.session import Output
from runtime.web.config import WebConfig
from runtime.web.images import ImageError, check_image, decode_image, encode_jpeg, image_header
from runtime.web.protocol import ProtocolError, pack, unpack
from runtime.web.server import bind_socket, make_app, origin_allowed
from runtime.web.sessions import Busy, FrameOut, SessionClosed, SessionManager, Skip

ROOT = Path(__file__).resolve().parents[1]
R = 128


# ----------------------------------------------------------------------------------- fakes
class FakeSession:
    """Stands in for LiveSession: sleeps `delay`, returns a flat image of its own `fill` value."""

    def __init__(self, live, cfg):
        self.live, self.cfg, self.calls = live, cfg, []
        self.fill = 20 + 40 * (len(live.sessions) % 6)

    def set_source(self, image):
        self.calls.append(("source", int(image.float().mean())))

    def reset(self):
        self.calls.append(("reset",))

    def step(self, pose, local, tag=None, clock=None):
        time.sleep(self.live.delay)
        self.live.served.append((self.fill, time.monotonic()))
        return Output(torch.full((R, R, 3), self.fill, dtype=torch.uint8), tag)


class FakeLive:
    def __init__(self, delay: float = 0.02):
        self.cfg = LiveConfig.from_name("tiny", steps=1, window=3)
        self.delay, self.random_weights, self.sessions, self.served = delay, True, [], []

    def new_session(self, **overrides):
        s = FakeSession(self, replace(self.cfg, **overrides))
        self.sessions.append(s)
        return s


def fake_tracker(_landmarks):
    def track(rgb, t):
        pose = cv2.resize(rgb, (R, R))
        return SimpleNamespace(pose=pose, local=np.zeros_like(pose), face=True)
    return track


def jpeg(value: int = 128, size: int = 64) -> bytes:
    return encode_jpeg(np.full((size, size, 3), value, np.uint8))


def manager(delay=0.02, **web) -> SessionManager:
    source = (np.full((R, R, 3), 100, np.uint8), None)
    m = SessionManager(FakeLive(delay), WebConfig(**web), source, tracker_factory=fake_tracker)
    return m.start()


def wait_result(m: SessionManager, sid: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = m.poll(sid, 0.2)
        if out is not None:
            return out
    raise AssertionError(f"no result for session {sid} in {timeout} s")


# ---------------------------------------------------------------------------------- images
@pytest.mark.parametrize("ext,fmt,params", [(".jpg", "jpeg", []), (".png", "png", []),
                                            (".webp", "webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
                                            (".webp", "webp", [cv2.IMWRITE_WEBP_QUALITY, 101])])  # 101: lossless
def test_image_header_reads_size_without_decoding(ext, fmt, params):
    rgb = np.random.default_rng(0).integers(0, 255, (23, 37, 3), dtype=np.uint8)
    data = cv2.imencode(ext, rgb, params)[1].tobytes()
    assert image_header(data) == (fmt, 37, 23)
    assert decode_image(data, 1 << 20, 10_000).shape == (23, 37, 3)


def test_decode_keeps_rgb_order():
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    out = decode_image(encode_jpeg(red, 95), 1 << 20, 1000)
    assert out[..., 0].mean() > 240 and out[..., 2].mean() < 15


def _png_claiming(w: int, h: int) -> bytes:
    ihdr = struct.pack(">II", w, h) + b"\x08\x02\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\x00" * 4


def _jpeg_claiming(w: int, h: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9 + sof + b"\x00" * 32


@pytest.mark.parametrize("bomb", [_png_claiming(100_000, 100_000), _jpeg_claiming(60_000, 60_000)])
def test_decompression_bomb_is_refused_before_decoding(bomb, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the decoder ran on an image whose header is over the limit")
    monkeypatch.setattr(cv2, "imdecode", never)
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(bomb, 1 << 20, 24_000_000)


@pytest.mark.parametrize("data,match", [
    (b"", "empty"), (b"GIF89a" + b"\x00" * 40, "not a JPEG, PNG or WebP"), (b"\x00" * 100, "not a JPEG"),
    (b"\xff\xd8\xff\xe0\x00\x02", "no frame header"), (b"\x89PNG\r\n\x1a\n\x00", "IHDR"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "cut short")])
def test_malformed_images_are_rejected_cleanly(data, match):
    with pytest.raises(ImageError, match=match):
        decode_image(data, 1 << 20, 10_000)


def test_truncated_jpeg_is_rejected():
    data = jpeg(size=64)
    with pytest.raises(ImageError, match="could not be decoded"):
        decode_image(data[:len(data) // 3], 1 << 20, 10_000)


def test_byte_and_side_limits():
    data = jpeg(size=64)
    with pytest.raises(ImageError, match="bytes is over the limit"):
        check_image(data, 100, 10_000)
    with pytest.raises(ImageError, match="64x64 pixels is over the limit"):
        check_image(data, 1 << 20, 10_000, max_side=32)
    with pytest.raises(ImageError, match="png is not accepted"):
        check_image(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes(), 1 << 20, 100,
                    formats=("jpeg", "webp"))


# -------------------------------------------------------------------------- protocol, config
def test_protocol_round_trip_and_errors():
    msg = pack({"kind": "frame", "seq": 3, "t": 1.5}, b"\xff\xd8payload")
    assert unpack(msg) == ({"kind": "frame", "seq": 3, "t": 1.5}, b"\xff\xd8payload")
    for bad in (b"\x01", struct.pack("<I", 10**6) + b"{}", struct.pack("<I", 3) + b"{{{", struct.pack("<I", 2) + b"[]"):
        with pytest.raises(ProtocolError):
            unpack(bad)


def test_config_checks_and_bind_warnings():
    assert WebConfig().bind_warnings() == []
    assert WebConfig(host="::1").bind_warnings() == []
    warn = WebConfig(host="0.0.0.0").bind_warnings()
    assert len(warn) == 2 and "--token" in warn[1] and "TLS" in warn[0]
    assert len(WebConfig(host="0.0.0.0", token="a-long-token").bind_warnings()) == 1
    with pytest.raises(ValueError, match="--max-sessions"):
        WebConfig(max_sessions=0).validated()
    with pytest.raises(ValueError, match="at least 8"):
        WebConfig(token="short").validated()
    with pytest.raises(ValueError, match="--allow-origin"):
        WebConfig(allow_origins=("example.org",)).validated()


def test_from_args_on_the_webcam_parser():
    from runtime.webcam import parser
    a = parser().parse_args(["--serve", "--port", "8123"])  # defaults of the web flags
    cfg = WebConfig.from_args(a)
    assert (cfg.host, cfg.port, cfg.max_sessions, cfg.token) == ("127.0.0.1", 8123, 4, None)
    p = parser()  # runtime.webcam's parser carries the web server's flags (add_arguments)
    a = p.parse_args(["--serve", "--host", "0.0.0.0", "--token", "abcdefgh12", "--max-sessions", "2",
                      "--allow-origin", "https://gpu.example.org"])
    cfg = WebConfig.from_args(a)
    assert (cfg.host, cfg.token, cfg.max_sessions, cfg.allow_origins) == \
        ("0.0.0.0", "abcdefgh12", 2, ("https://gpu.example.org",))


def test_origin_rule():
    assert origin_allowed(None, "127.0.0.1:8000")
    assert origin_allowed("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert not origin_allowed("http://evil.example:8000", "127.0.0.1:8000")
    assert not origin_allowed("http://127.0.0.1:9999", "127.0.0.1:8000")
    assert not origin_allowed("null", "127.0.0.1:8000")
    assert origin_allowed("https://proxy.example", "127.0.0.1:8000", ("https://proxy.example",))


# ------------------------------------------------------------------------------- sessions
def test_session_limit_busy_and_close_frees():
    m = manager(max_sessions=2)
    try:
        a, b = m.open(), m.open()
        assert a != b
        with pytest.raises(Busy, match="--max-sessions"):
            m.open()
        m.close(a)
        c = m.open()
        assert m.stats()["sessions"] == 2 and m.stats()["busy"] == 1
        assert {d["id"] for d in m.stats()["detail"]} == {b, c}
        with pytest.raises(SessionClosed):
            m.push(a, jpeg(), 0.0)
    finally:
        m.stop()


def test_latest_frame_wins_and_drops_are_counted():
    m = manager(delay=0.3)
    try:
        sid = m.open()
        wait_result(m, m.push(sid, jpeg(), 0.0) and sid)  # warm: the session is built
        for k in range(2, 22):
            m.push(sid, jpeg(), float(k), seq=k)
        seqs = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (not seqs or seqs[-1] != 21):
            out = m.poll(sid, 0.2)
            if isinstance(out, FrameOut):
                seqs.append(out.seq)
        assert seqs and seqs[-1] == 21, seqs
        assert len(seqs) <= 3, f"frames queued up instead of being dropped: {seqs}"
        detail = m.stats()["detail"][0]
        assert detail["frames_in"] == 21 and detail["dropped"] >= 17, detail
    finally:
        m.stop()


def test_round_robin_is_fair_against_a_flooding_session():
    m = manager(delay=0.03)
    try:
        fast, slow = m.open(), m.open()
        for sid in (fast, slow):
            wait_result(m, m.push(sid, jpeg(), 0.0) and sid)
        fills = {s.fill for s in m.live.sessions}
        fast_fill, slow_fill = m.live.sessions[0].fill, m.live.sessions[1].fill
        assert len(fills) == 2
        stop = threading.Event()

        def flood():
            while not stop.is_set():
                m.push(fast, jpeg(), 0.0)
                time.sleep(0.002)
        t = threading.Thread(target=flood)
        t.start()
        served_slow = 0
        try:
            time.sleep(0.2)
            for k in range(8):  # the slow session sends one frame and waits for its answer, 8 times
                m.live.served.clear()
                m.push(slow, jpeg(), float(k))
                out = wait_result(m, slow, 5)
                assert out.jpeg and isinstance(out, FrameOut)
                before = [f for f, _ in m.live.served]
                # served within one turn: at most the frame in progress and one more of the flooding session
                assert before.count(fast_fill) <= 2 and before[-1] == slow_fill, before
                served_slow += 1
        finally:
            stop.set()
            t.join()
        assert served_slow == 8
    finally:
        m.stop()


def test_results_go_to_their_own_session():
    m = manager(delay=0.01)
    try:
        a, b = m.open(), m.open()
        fills = {}
        for _ in range(3):
            for sid in (a, b):
                out = wait_result(m, m.push(sid, jpeg(), 0.0) and sid)
                assert out.session == sid
                fills.setdefault(sid, set()).add(int(decode_image(out.jpeg, 1 << 20, 1 << 20).mean().round()))
        assert len(fills[a]) == 1 and len(fills[b]) == 1 and fills[a] != fills[b], fills
    finally:
        m.stop()


def test_idle_session_is_closed():
    m = manager(idle_timeout=0.4)
    try:
        sid = m.open()
        deadline = time.monotonic() + 5
        while m.stats()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert m.stats()["sessions"] == 0
        with pytest.raises(SessionClosed, match="idle"):
            m.poll(sid, 0.1)
    finally:
        m.stop()


def test_commands_reset_configure_source():
    m = manager()
    try:
        sid = m.open()
        assert m.reset(sid).result(5) is True
        assert ("reset",) in m.live.sessions[-1].calls
        assert m.configure(sid, steps=2, window=7).result(5) == {"steps": 2, "window": 7}
        rebuilt = m.live.sessions[-1]
        assert (rebuilt.cfg.steps, rebuilt.cfg.window) == (2, 7) and rebuilt.calls[0][0] == "source"
        with pytest.raises(ValueError, match="allows steps"):
            m.configure(sid, steps=9)
        with pytest.raises(ImageError):
            m.set_source(sid, b"\x89PNG\r\n\x1a\n broken")
        m.set_source(sid, (ROOT / "samples" / "source.png").read_bytes())  # a real face: cropped and applied
        assert rebuilt.calls[-1][0] == "source" and len(rebuilt.calls) == 2
        info = m.info(sid)
        assert info["steps"] == 2 and 1 in info["options"]["steps"] and info["random_weights"] is True
    finally:
        m.stop()


def test_push_rejects_bad_frames_at_once_and_skips_undecodable_ones():
    m = manager(max_frame_bytes=4096)
    try:
        sid = m.open()
        with pytest.raises(ImageError, match="over the limit"):
            m.push(sid, jpeg(size=256) + b"\x00" * 5000, 0.0)
        with pytest.raises(ImageError, match="not a JPEG"):
            m.push(sid, b"hello world" * 10, 0.0)
        good = jpeg(size=64)
        m.push(sid, good[:good.index(b"\xff\xda") + 4], 0.0, seq=5)  # the header is intact, the scan is cut
        out = wait_result(m, sid)
        assert isinstance(out, Skip) and out.seq == 5 and "decoded" in out.reason
        assert m.stats()["detail"][0]["bad_frames"] == 1
    finally:
        m.stop()


# --------------------------------------------------------------------------------- server
class Served:
    """The aiohttp app on 127.0.0.1 (a free port) in a background event loop."""

    def __init__(self, m: SessionManager):
        from aiohttp import web
        self.m, self.loop = m, asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            runner = web.AppRunner(make_app(m, m.web), access_log=None)
            await runner.setup()
            sock = bind_socket("127.0.0.1", 0)
            await web.SockSite(runner, sock).start()
            return runner, sock.getsockname()[1]
        self.runner, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.base = f"http://127.0.0.1:{self.port}/"

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.m.stop()


@pytest.fixture
def served(request):
    params = getattr(request, "param", {})
    s = Served(manager(**params))
    yield s
    s.close()


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """One HTTP request with the path sent byte for byte (no client-side normalisation)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def receive_until(ws, want, timeout=10.0):
    """Messages until want(msg) is true; returns that message (aiohttp WSMessage)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = await ws.receive(timeout=deadline - time.monotonic())
        if want(msg):
            return msg
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            raise AssertionError(f"socket closed: {msg}")
    raise AssertionError("timed out")


def is_text(kind):
    return lambda m: m.type == aiohttp.WSMsgType.TEXT and m.json().get("type") == kind


def is_frame(m):
    return m.type == aiohttp.WSMsgType.BINARY


def test_page_assets_and_no_path_traversal(served):
    status, body = raw_get(served.port, "/")
    assert status == 200 and b"static/app.js" in body and b"Content-Security-Policy" in body
    status, body = raw_get(served.port, "/static/app.js")
    assert status == 200 and b"text/javascript" in body
    secret = b"def make_app"  # text of server.py, one folder above static/
    for path in ("/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e%2fserver.py",
                 "/static/..%5cserver.py", "/../runtime/web/server.py", "/runtime/web/server.py",
                 "/static/", "/static/%2e%2e/%2e%2e/README.md", "//etc/passwd", "/static/app.js%00.png"):
        status, body = raw_get(served.port, path)
        assert status in (400, 404), (path, status)
        assert secret not in body and b"root:" not in body, path


def test_websocket_origin_must_match(served):
    async def go():
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await s.ws_connect(served.base + "ws", headers={"Origin": "http://evil.example"})
            assert e.value.status == 403
            async with s.ws_connect(served.base + "ws", headers={"Origin": served.base.rstrip("/")}) as ws:
                assert (await ws.receive_json())["type"] == "hello"
    run(go())
    assert served.m.stats()["opened"] == 1


@pytest.mark.parametrize("served", [{"token": "secret-token-1", "host": "127.0.0.1"}], indirect=True)
def test_token_is_required_when_set(served):
    async def go():
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await s.ws_connect(served.base + "ws")
            assert e.value.status == 401
            assert (await s.get(served.base + "api/stats")).status == 401
            assert (await s.get(served.base + "api/stats?token=wrong-token")).status == 401
            assert (await s.get(served.base + "api/stats?token=secret-token-1")).status == 200
            async with s.ws_connect(served.base + "ws?token=secret-token-1") as ws:
                assert (await ws.receive_json())["type"] == "hello"
    run(go())


@pytest.mark.parametrize("served", [{"max_frame_bytes": 8192, "max_upload_bytes": 65536}], indirect=True)
def test_oversized_and_malformed_messages(served):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(served.base + "ws") as ws:
                await ws.receive_json()
                big = jpeg(size=64) + b"\x00" * 20000  # over max_frame_bytes, under the socket limit
                await ws.send_bytes(pack({"kind": "frame", "seq": 1, "t": 1.0}, big))
                m = (await receive_until(ws, is_text("skip"))).json()
                assert m["seq"] == 1 and "over the limit" in m["reason"]
                await ws.send_bytes(pack({"kind": "frame", "seq": 2, "t": 2.0}, b"\xff\xd8\xff" + b"\x13" * 500))
                m = (await receive_until(ws, is_text("skip"))).json()
                assert m["seq"] == 2 and "JPEG" in m["reason"]
                await ws.send_bytes(b"\x00\x00")
                assert "header" in (await receive_until(ws, is_text("error"))).json()["message"]
                await ws.send_str("{not json")
                assert "JSON" in (await receive_until(ws, is_text("error"))).json()["message"]
                await ws.send_str('{"type": "format-disk"}')
                assert "unknown" in (await receive_until(ws, is_text("error"))).json()["message"]
                await ws.send_bytes(pack({"kind": "source"}, _png_claiming(50_000, 50_000)))
                m = (await receive_until(ws, is_text("source"))).json()
                assert m["ok"] is False and "over the limit" in m["message"]
                await ws.send_bytes(pack({"kind": "source"}, b"\x89PNG\r\n\x1a\n" + b"\x00" * 100))
                assert (await receive_until(ws, is_text("source"))).json()["ok"] is False
                # the session still works after all that
                await ws.send_bytes(pack({"kind": "frame", "seq": 3, "t": 3.0}, jpeg()))
                h, payload = unpack((await receive_until(ws, is_frame)).data)
                assert h["seq"] == 3 and h["t"] == 3.0 and payload[:2] == b"\xff\xd8"
                # a message over the socket's own limit closes it (1009: too big)
                await ws.send_bytes(b"\x00" * 200_000)
                msg = await ws.receive(timeout=10)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code == 1009
    run(go())


@pytest.mark.parametrize("served", [{"max_rate": 20.0}], indirect=True)
def test_message_flood_closes_the_socket_and_others_keep_working(served):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(served.base + "ws") as ws:
                await ws.receive_json()
                for k in range(400):
                    await ws.send_bytes(pack({"kind": "frame", "seq": k + 1, "t": 0.0}, jpeg()))
                closed = await receive_until(ws, lambda m: m.type in (aiohttp.WSMsgType.CLOSE,
                                                                      aiohttp.WSMsgType.CLOSED), timeout=15)
                assert closed and ws.close_code == 1008
            stats = await (await s.get(served.base + "api/stats")).json()
            assert stats["server"]["rate_closed"] == 1
            assert stats["frames_out"] <= 25, "flooded frames were queued, not dropped"
            async with s.ws_connect(served.base + "ws") as ws:
                await ws.receive_json()
                await ws.send_bytes(pack({"kind": "frame", "seq": 1, "t": 5.0}, jpeg()))
                h, _ = unpack((await receive_until(ws, is_frame)).data)
                assert h["seq"] == 1
    run(go())


@pytest.mark.parametrize("served", [{"max_sessions": 1}], indirect=True)
def test_too_many_sessions_get_busy_and_a_closed_socket_frees_its_session(served):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(served.base + "ws") as first:
                hello = await first.receive_json()
                async with s.ws_connect(served.base + "ws") as second:
                    m = await second.receive_json()
                    assert m["type"] == "busy" and "--max-sessions" in m["message"]
                    msg = await second.receive(timeout=5)
                    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                    assert second.close_code == 1013
                stats = await (await s.get(served.base + "api/stats")).json()
                assert [d["id"] for d in stats["detail"]] == [hello["session"]]
            deadline = time.monotonic() + 5
            while (await (await s.get(served.base + "api/stats")).json())["sessions"] and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert (await (await s.get(served.base + "api/stats")).json())["sessions"] == 0
            async with s.ws_connect(served.base + "ws") as third:
                assert (await third.receive_json())["type"] == "hello"
    run(go())


def test_two_sockets_each_get_their_own_frames_and_commands(served):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(served.base + "ws") as a, s.ws_connect(served.base + "ws") as b:
                ha, hb = await a.receive_json(), await b.receive_json()
                assert ha["session"] != hb["session"]
                for k in range(3):
                    for ws, t in ((a, 100.0 + k), (b, 200.0 + k)):
                        await ws.send_bytes(pack({"kind": "frame", "seq": k + 1, "t": t}, jpeg()))
                    for ws, h0, t in ((a, ha, 100.0 + k), (b, hb, 200.0 + k)):
                        h, _ = unpack((await receive_until(ws, is_frame)).data)
                        assert h["session"] == h0["session"] and h["t"] == t
                await a.send_str('{"type": "reset"}')
                assert (await receive_until(a, is_text("reset"))).json()["ok"] is True
                await b.send_str('{"type": "config", "steps": 2, "window": 0}')
                m = (await receive_until(b, is_text("config"))).json()
                assert (m["steps"], m["window"]) == (2, 0)
                await b.send_str('{"type": "config", "steps": 50}')
                assert "allows" in (await receive_until(b, is_text("error"))).json()["message"]
    run(go())


# ----------------------------------------------------------------------------- real model
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_real_tiny_model_round_trip(device, one_thread):
    """The real tiny model, landmarker and face tracker behind the manager: frames of the driving
    sample go in as JPEG and come back animated, with their seq and timestamp. On CUDA this runs
    the page-locked upload/download path with events."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the page-locked transfer path)")
    from runtime.landmarks import default_landmarker
    from runtime.live.factory import load_live
    from runtime.preprocess import prepare_source
    from runtime.video_io import read_image, read_video
    lm = default_landmarker()
    live = load_live(LiveConfig.from_name("tiny", steps=1, window=3, device=device))
    source = prepare_source(read_image(ROOT / "samples" / "source.png"), R, lm)
    m = SessionManager(live, WebConfig(), source, landmarker=lm).start()
    try:
        sid = m.open()
        frames = read_video(ROOT / "samples" / "driving.mp4").frames
        for k in range(3):
            m.push(sid, encode_jpeg(frames[k * 5]), t_client=10.0 * k, seq=k + 1)
            out = wait_result(m, sid, 60)
            assert isinstance(out, FrameOut), out
            assert (out.seq, out.t_client, out.face) == (k + 1, 10.0 * k, True)
            image = decode_image(out.jpeg, 1 << 20, 1 << 20)
            assert image.shape == (R, R, 3) and image.std() > 1
            assert {"hint", "unet", "decode"} <= set(out.stages)
        detail = m.stats()["detail"][0]
        assert detail["frames_out"] == 3 and detail["state_mib"] > 0
    finally:
        m.stop()
