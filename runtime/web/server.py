"""The HTTP side of the browser client: one page, one WebSocket per tab, a stats endpoint.

    python -m runtime.webcam --serve [--host 127.0.0.1 --port 8000]   # then open http://127.0.0.1:8000/

Routes: `/` (the page), `/static/<name>` (only the files of runtime/web/static, looked up by exact
name, so no path can leave that folder), `/ws` (the session; protocol in runtime/web/protocol.py
and docs/web.md) and `/api/stats` (JSON). Everything else is 404.

Safety: the default bind is 127.0.0.1; another --host prints a warning and --token TOKEN makes the
WebSocket and /api require ?token=TOKEN. WebSocket upgrades whose Origin is not the page's own
(or an --allow-origin) are refused, so another site open in the same browser cannot drive the
session. Messages are bounded in size (aiohttp closes the socket past max_msg_size) and in rate
(a token bucket per socket; a sustained flood closes it with 1008). Frames and uploads are checked
by their image header before decoding (runtime/web/images.py).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import re
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from runtime.web.config import WebConfig
from runtime.web.images import ImageError
from runtime.web.protocol import ProtocolError, pack, parse_text, unpack
from runtime.web.sessions import Busy, FrameOut, SessionClosed, SessionManager

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the page URL may carry the token
    "Cache-Control": "no-store",
}
MANAGER = web.AppKey("manager", SessionManager)
CONFIG = web.AppKey("config", WebConfig)
POOL = web.AppKey("pool", ThreadPoolExecutor)
COUNTERS = web.AppKey("counters", dict)
ASSETS = web.AppKey("assets", dict)


def load_assets(folder: Path = STATIC) -> dict[str, tuple[bytes, str]]:
    """The page's own files, read once: name -> (bytes, content type)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and re.fullmatch(r"[a-z0-9_-]+\.[a-z]+", p.name) and p.suffix in _TYPES:
            out[p.name] = (p.read_bytes(), _TYPES[p.suffix])
    if "index.html" not in out:
        raise FileNotFoundError(f"{folder}/index.html is missing: the package is incomplete, reinstall it")
    return out


def origin_allowed(origin: str | None, host: str | None, allow: tuple[str, ...] = ()) -> bool:
    """A browser's WebSocket must come from the page's own origin (or one allowed by the operator).
    A client that sends no Origin is not a browser page, so it cannot be a cross-site request."""
    if origin is None:
        return True
    if origin in allow:
        return True
    u = urlsplit(origin)
    return u.scheme in ("http", "https") and bool(host) and u.netloc.lower() == host.lower()


def token_ok(request: web.Request, token: str | None) -> bool:
    if token is None:
        return True
    given = request.query.get("token") or request.headers.get("Authorization", "").removeprefix("Bearer ")
    return hmac.compare_digest(given.encode(), token.encode())


class RateLimit:
    """Token bucket: `rate` messages per second with a burst of one second. `over` counts the
    messages refused in a row; the caller closes the socket once it passes `rate`."""

    def __init__(self, rate: float):
        self.rate, self.tokens, self.t, self.over = rate, rate, time.monotonic(), 0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.over = 0
            return True
        self.over += 1
        return False


@web.middleware
async def _security_headers(request: web.Request, handler):
    resp = await handler(request)
    if not resp.prepared:
        resp.headers.update(_HEADERS)
    return resp


def make_app(manager: SessionManager, cfg: WebConfig) -> web.Application:
    app = web.Application(middlewares=[_security_headers], client_max_size=64 << 10)
    app[MANAGER], app[CONFIG] = manager, cfg
    app[POOL] = ThreadPoolExecutor(max_workers=2 * cfg.max_sessions + 4, thread_name_prefix="web-io")
    app[COUNTERS] = {"origin_rejected": 0, "token_rejected": 0, "rate_closed": 0, "busy": 0}
    app[ASSETS] = load_assets()
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/ws", _websocket)
    app.router.add_get("/api/stats", _stats)
    app.on_cleanup.append(_cleanup)
    return app


async def _cleanup(app: web.Application) -> None:
    app[POOL].shutdown(wait=False, cancel_futures=True)


async def _index(request: web.Request) -> web.Response:
    body, ctype = request.app[ASSETS]["index.html"]
    return web.Response(body=body, content_type=ctype, charset="utf-8")


async def _static(request: web.Request) -> web.Response:
    asset = request.app[ASSETS].get(request.match_info["name"])
    if asset is None:
        raise web.HTTPNotFound(text="not found")
    return web.Response(body=asset[0], content_type=asset[1])


async def _stats(request: web.Request) -> web.Response:
    if not token_ok(request, request.app[CONFIG].token):
        request.app[COUNTERS]["token_rejected"] += 1
        raise web.HTTPUnauthorized(text="token required: add ?token=TOKEN")
    stats = {**request.app[MANAGER].stats(), "server": request.app[COUNTERS]}
    return web.json_response(stats)


async def _websocket(request: web.Request) -> web.StreamResponse:
    app, cfg = request.app, request.app[CONFIG]
    if not origin_allowed(request.headers.get("Origin"), request.host, cfg.allow_origins):
        app[COUNTERS]["origin_rejected"] += 1
        raise web.HTTPForbidden(text="WebSocket origin does not match this server (see --allow-origin)")
    if not token_ok(request, cfg.token):
        app[COUNTERS]["token_rejected"] += 1
        raise web.HTTPUnauthorized(text="token required: open the URL printed by the server (?token=...)")
    ws = web.WebSocketResponse(max_msg_size=max(cfg.max_upload_bytes, cfg.max_frame_bytes) + 8192, heartbeat=20)
    await ws.prepare(request)
    manager, loop = app[MANAGER], asyncio.get_running_loop()
    try:
        sid = await loop.run_in_executor(app[POOL], manager.open)
    except Busy as e:
        app[COUNTERS]["busy"] += 1
        await ws.send_json({"type": "busy", "message": str(e)})
        await ws.close(code=1013, message=b"busy")
        return ws
    await ws.send_json({"type": "hello", **manager.info(sid)})
    sender = asyncio.create_task(_send_results(ws, app, sid))
    try:
        await _receive(ws, app, sid)
    finally:
        sender.cancel()
        manager.close(sid, "the page closed its connection")
    return ws


async def _send_results(ws: web.WebSocketResponse, app: web.Application, sid: str) -> None:
    manager, loop = app[MANAGER], asyncio.get_running_loop()
    while not ws.closed:
        try:
            out = await loop.run_in_executor(app[POOL], manager.poll, sid, 0.5)
        except SessionClosed as e:
            await _send(ws, {"type": "closed", "reason": e.reason})
            await ws.close(code=1001, message=e.reason[:100].encode())
            return
        if out is None:
            continue
        if isinstance(out, FrameOut):
            head = {"kind": "frame", "session": out.session, "seq": out.seq, "t": out.t_client, "face": out.face,
                    "server_ms": round(out.server_ms, 1), "dropped": out.dropped,
                    "stages": {k: round(v, 1) for k, v in out.stages.items()}}
            await _send(ws, pack(head, out.jpeg))
        else:
            await _send(ws, {"type": "skip", "seq": out.seq, "reason": out.reason})


async def _send(ws: web.WebSocketResponse, msg) -> None:
    if ws.closed:
        return
    try:
        await (ws.send_bytes(msg) if isinstance(msg, bytes) else ws.send_json(msg))
    except ConnectionError:
        pass


async def _receive(ws: web.WebSocketResponse, app: web.Application, sid: str) -> None:
    cfg, limit, busy = app[CONFIG], RateLimit(app[CONFIG].max_rate), {"source": False}
    async for msg in ws:
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            break
        if not limit.allow():
            if limit.over > cfg.max_rate:
                app[COUNTERS]["rate_closed"] += 1
                await _send(ws, {"type": "error", "message": f"over {cfg.max_rate:.0f} messages per second"})
                await ws.close(code=1008, message=b"message rate over the limit")
                return
            continue
        try:
            if msg.type == WSMsgType.TEXT:
                await _on_text(ws, app, sid, msg.data)
            else:
                await _on_binary(ws, app, sid, msg.data, busy)
        except SessionClosed:
            return
        except (ProtocolError, ValueError) as e:
            await _send(ws, {"type": "error", "message": str(e)})


async def _on_text(ws: web.WebSocketResponse, app: web.Application, sid: str, data: str) -> None:
    m = parse_text(data)
    manager, kind = app[MANAGER], m.get("type")
    if kind == "ping":
        await _send(ws, {"type": "pong", "t": m.get("t")})
    elif kind == "reset":
        _reply_when_done(ws, manager.reset(sid), lambda _: {"type": "reset", "ok": True})
    elif kind == "config":
        fut = manager.configure(sid, m.get("steps"), m.get("window"))
        _reply_when_done(ws, fut, lambda r: {"type": "config", "ok": True, **r,
                                             "max_in_flight": manager.info(sid)["max_in_flight"]})
    else:
        raise ProtocolError(f"unknown message type {kind!r}; expected ping, reset or config")


def _reply_when_done(ws: web.WebSocketResponse, fut, reply) -> None:
    async def wait():
        try:
            result = await asyncio.wrap_future(fut)
            await _send(ws, reply(result))
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - reported to the page
            await _send(ws, {"type": "error", "message": str(e)})
    asyncio.ensure_future(wait())


async def _on_binary(ws: web.WebSocketResponse, app: web.Application, sid: str, data: bytes, busy: dict) -> None:
    header, payload = unpack(data)
    manager, cfg, kind = app[MANAGER], app[CONFIG], header.get("kind")
    if kind == "frame":
        seq = header.get("seq")
        if not isinstance(seq, int) or not isinstance(header.get("t"), (int, float)):
            raise ProtocolError("a frame header needs an integer seq and a numeric t")
        try:
            manager.push(sid, payload, float(header["t"]), seq)
        except ImageError as e:
            await _send(ws, {"type": "skip", "seq": seq, "reason": str(e)})
    elif kind == "source":
        if busy["source"]:
            raise ProtocolError("a source upload is still being applied; wait for its answer")
        if len(payload) > cfg.max_upload_bytes:
            return await _send(ws, {"type": "source", "ok": False, "message": f"source portrait of {len(payload)} "
                                    f"bytes is over the limit of {cfg.max_upload_bytes}: send a smaller file"})
        busy["source"] = True
        asyncio.ensure_future(_apply_source(ws, app, sid, payload, busy))
    else:
        raise ProtocolError(f"unknown binary message kind {kind!r}; expected frame or source")


async def _apply_source(ws, app, sid: str, payload: bytes, busy: dict) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(app[POOL], app[MANAGER].set_source, sid, payload)
        await _send(ws, {"type": "source", "ok": True})
    except SessionClosed:
        pass
    except (ValueError, TimeoutError) as e:  # ImageError, NoFaceError
        await _send(ws, {"type": "source", "ok": False, "message": str(e)})
    finally:
        busy["source"] = False


# --------------------------------------------------------------------------------- entry point
def serve(args, cfg) -> int:
    """`python -m runtime.webcam --serve`: load the model once, serve until Ctrl-C. Returns 0."""
    from runtime.landmarks import default_landmarker
    from runtime.live.factory import load_live
    from runtime.preprocess import prepare_source
    from runtime.video_io import read_image
    from runtime.webcam import RANDOM_BANNER, SAMPLE_SOURCE
    web_cfg = WebConfig.from_args(args)
    for line in web_cfg.bind_warnings():
        print(f"warning: {line}", file=sys.stderr)
    landmarker = default_landmarker()
    source = prepare_source(read_image((args.source or [SAMPLE_SOURCE])[0]), cfg.image_size(), landmarker)
    t0 = time.perf_counter()
    live = load_live(cfg, checkpoint=args.checkpoint, taesd=args.taesd, lora=args.lora, engines=args.engines)
    if live.random_weights:
        print(RANDOM_BANNER, file=sys.stderr)
    print(f"model ready in {time.perf_counter() - t0:.1f} s: {cfg.preset} on {cfg.device} ({cfg.backend}), "
          f"{cfg.steps} steps, window {cfg.window}", file=sys.stderr)
    manager = SessionManager(live, web_cfg, source, landmarker).start()
    try:
        asyncio.run(_serve_forever(make_app(manager, web_cfg), web_cfg))
    finally:
        manager.stop()
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, reuse_port=False)


async def _serve_forever(app: web.Application, cfg: WebConfig) -> None:
    sock = bind_socket(cfg.host, cfg.port)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    query = f"?token={cfg.token}" if cfg.token else ""
    print(f"serving on http://{shown}:{port}/{query}  (Ctrl-C to stop)", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
