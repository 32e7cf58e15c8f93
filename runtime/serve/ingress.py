"""The HTTP side under Ray Serve: a FastAPI ingress deployment that serves the page and relays each
WebSocket to the model replica holding its session.

    browser --ws--> Serve HTTP proxy --ASGI--> Ingress replica --handle calls--> LiveReplica
                    (every node)              (relay.py, one per socket)       (session router: sticky)

Routes are those of runtime/web/server.py: `/` and `/static/<name>` (the same page, from the same
in-memory asset list), `/ws` (the same protocol; Origin and token checked before the upgrade) and
`/api/stats` (this ingress replica's sessions and their moves). Frames cross the ingress as bytes:
it never decodes an image.
"""
# no `from __future__ import annotations`: FastAPI must see the real WebSocket/Response classes
# in the signatures of the routes below (they are imported inside ingress_deployment()).
import hmac
import logging
from collections import deque
from typing import AsyncIterator

from runtime.serve.config import resolve
from runtime.serve.relay import Relay, ReplicaGone
from runtime.web.server import _HEADERS, load_assets, origin_allowed

log = logging.getLogger(__name__)
CALLS = ("open", "push", "set_source", "command", "close")


def _gone_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex
    return (rex.RayActorError, rex.ActorUnavailableError)


class ServeBackend:
    """relay.Backend over a DeploymentHandle of LiveReplica (the session router makes it sticky)."""

    def __init__(self, handle):
        self.calls = {m: handle.options(method_name=m) for m in CALLS}
        self.stream = handle.options(method_name="frames", stream=True)
        self.gone = _gone_errors()

    async def _call(self, method: str, *args, **kwargs) -> dict:
        try:
            return await self.calls[method].remote(*args, **kwargs)
        except self.gone as e:
            raise ReplicaGone(str(e)) from e

    async def open(self, sid, source, steps, window, avoid=()) -> dict:
        return await self._call("open", sid, source, steps, window, avoid=tuple(avoid))

    async def push(self, sid, data, t, seq) -> dict:
        return await self._call("push", sid, data, t, seq)

    async def frames(self, sid) -> AsyncIterator[dict]:
        try:
            async for item in self.stream.remote(sid):
                yield item
        except self.gone as e:
            raise ReplicaGone(str(e)) from e

    async def set_source(self, sid, data) -> dict:
        return await self._call("set_source", sid, data)

    async def command(self, sid, kind, steps=None, window=None) -> dict:
        return await self._call("command", sid, kind, steps, window)

    async def close(self, sid, reason) -> dict:
        return await self._call("close", sid, reason)


class StarletteSocket:
    """relay.Socket over a Starlette WebSocket."""

    def __init__(self, ws):
        self.ws = ws

    async def receive(self) -> str | bytes | None:
        msg = await self.ws.receive()
        if msg["type"] == "websocket.disconnect":
            return None
        return msg["bytes"] if msg.get("bytes") is not None else msg.get("text")

    async def send(self, msg: str | bytes) -> None:
        try:
            await (self.ws.send_bytes(msg) if isinstance(msg, bytes) else self.ws.send_text(msg))
        except Exception as e:  # noqa: BLE001 - the page went away: one error type for the relay
            raise ConnectionError(str(e)) from e

    async def close(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code, reason)
        except Exception as e:  # noqa: BLE001
            raise ConnectionError(str(e)) from e


def _token_ok(given: str, token: str | None) -> bool:
    return token is None or hmac.compare_digest(given.encode(), token.encode())


def ingress_deployment():
    """The Ingress deployment class (FastAPI is built here, not at import time)."""
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import JSONResponse, Response
    from ray import serve

    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @serve.deployment(name="Ingress")
    @serve.ingress(api)
    class Ingress:
        def __init__(self, live_handle, spec: dict):
            self.cfg, _, self.web, _ = resolve(spec)
            self.backend = ServeBackend(live_handle)
            self.assets = load_assets()
            self.relays: dict[str, Relay] = {}
            self.finished: deque = deque(maxlen=200)
            self.counters = {"origin_rejected": 0, "token_rejected": 0, "sockets": 0}

        def _asset(self, name: str) -> Response:
            asset = self.assets.get(name)
            if asset is None:
                return Response("not found", status_code=404, media_type="text/plain", headers=_HEADERS)
            return Response(asset[0], media_type=asset[1], headers=_HEADERS)

        @api.get("/")
        async def index(self) -> Response:
            return self._asset("index.html")

        @api.get("/static/{name}")
        async def static(self, name: str) -> Response:
            return self._asset(name)

        @api.get("/api/stats")
        async def stats(self, token: str = "") -> Response:
            if not _token_ok(token, self.web.token):
                self.counters["token_rejected"] += 1
                return Response("token required: add ?token=TOKEN", status_code=401, headers=_HEADERS)
            return JSONResponse({"ingress": serve.get_replica_context().replica_id.unique_id,
                                 "sessions": [r.summary() for r in self.relays.values()],
                                 "finished": list(self.finished), "counters": self.counters}, headers=_HEADERS)

        @api.websocket("/ws")
        async def ws(self, websocket: WebSocket) -> None:
            origin, host = websocket.headers.get("origin"), websocket.headers.get("host")
            if not origin_allowed(origin, host, self.web.allow_origins):
                log.warning("WebSocket refused: Origin %r does not match Host %r (see --allow-origin)", origin, host)
                self.counters["origin_rejected"] += 1
                await websocket.close(code=1008)
                return
            given = websocket.query_params.get("token") or \
                websocket.headers.get("authorization", "").removeprefix("Bearer ")
            if not _token_ok(given, self.web.token):
                self.counters["token_rejected"] += 1
                await websocket.close(code=1008)
                return
            await websocket.accept()
            self.counters["sockets"] += 1
            relay = Relay(self.backend, self.web, self.cfg)
            self.relays[relay.state.sid] = relay
            try:
                await relay.run(StarletteSocket(websocket))
            finally:
                self.relays.pop(relay.state.sid, None)
                self.finished.append(relay.summary())

    return Ingress
