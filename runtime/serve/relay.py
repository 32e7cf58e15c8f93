"""One browser WebSocket relayed to the replica that holds its session, and moved when that replica dies.

    relay = Relay(backend, web_cfg, serve_cfg)
    await relay.run(socket)      # returns when the page goes away or the session ends

Nothing here knows Ray or HTTP: `backend` has the replica calls (open/push/frames/set_source/command/
close, each taking the session id first; transport failures raise ReplicaGone), and `socket` has
receive() -> str | bytes | None, send(str | bytes) and close(code, reason). ingress.py plugs in Ray
Serve handles and a Starlette WebSocket; tests plug in in-process replicas and a fake page.

The page speaks the protocol of runtime/web (protocol.py, docs/web.md) unchanged. The relay picks
the session id, so a session keeps its id when it moves. When the replica's frame stream fails
(the actor died or became unreachable), answers "unknown session", or closes the session because
the model failed on it, the relay re-opens the session with the same id on another replica: the
source the page uploaded is sent again (re-encoded there), steps/window are re-applied, the temporal
cache starts empty. Meanwhile the newest camera frame is kept (latest wins) and pushed first once the
session is back; the page gets {"type": "moved", ...} and a `skip` that settles the frames lost
with the old replica, so its flow control never waits for them. Each move is recorded with its
measured gap (last frame before -> first frame after).
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from runtime.serve.config import ServeConfig
from runtime.web.config import WebConfig
from runtime.web.protocol import ProtocolError, pack, parse_text, unpack
from runtime.web.server import RateLimit

log = logging.getLogger(__name__)
OPEN_ATTEMPTS = 4  # a new session tries this many replicas (each busy one is avoided the next time)


class ReplicaGone(RuntimeError):
    """The replica holding a session died or cannot be reached."""


class Backend(Protocol):
    async def open(self, sid: str, source: bytes | None, steps: int | None, window: int | None,
                   avoid: tuple[str, ...] = ()) -> dict: ...
    async def push(self, sid: str, data: bytes, t: float, seq: int) -> dict: ...
    def frames(self, sid: str) -> AsyncIterator[dict]: ...
    async def set_source(self, sid: str, data: bytes) -> dict: ...
    async def command(self, sid: str, kind: str, steps: int | None = None, window: int | None = None) -> dict: ...
    async def close(self, sid: str, reason: str) -> dict: ...


class Socket(Protocol):
    async def receive(self) -> str | bytes | None: ...
    async def send(self, msg: str | bytes) -> None: ...
    async def close(self, code: int, reason: str) -> None: ...


@dataclass
class Move:
    reason: str
    from_replica: str
    to_replica: str | None = None
    detect_ms: float = 0.0         # last frame out -> failure seen
    reopen_ms: float | None = None  # failure seen -> session open on the new replica
    gap_ms: float | None = None     # last frame out before -> first frame out after
    lost: int = 0                   # frames pushed to the old replica after its last answer

    def as_dict(self) -> dict:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class RelayState:
    sid: str
    replica: str | None = None
    source: bytes | None = None     # the page's upload, kept to re-create the session elsewhere
    steps: int | None = None
    window: int | None = None
    last_pushed: int = 0            # seq of the last frame pushed to the current replica
    last_answered: int = 0
    last_frame_t: float | None = None
    stash: tuple[int, float, bytes] | None = None  # newest frame received while moving
    moves: list[Move] = field(default_factory=list)
    counters: dict = field(default_factory=lambda: {"frames_in": 0, "frames_out": 0, "skips": 0, "stray": 0,
                                                    "stashed": 0})


class Relay:
    def __init__(self, backend: Backend, web: WebConfig, cfg: ServeConfig, sid: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.backend, self.web, self.cfg, self.clock = backend, web, cfg, clock
        self.state = RelayState(sid or secrets.token_urlsafe(12))
        self.sock: Socket | None = None
        self.live = asyncio.Event()  # set while the session is open on a replica
        self.done = False
        self._source_busy = False
        self._tasks: set[asyncio.Task] = set()

    # --------------------------------------------------------------------------------- run
    async def run(self, sock: Socket) -> None:
        self.sock = sock
        reply = await self._open(first=True)
        if reply is None:
            return
        await self._send({"type": "hello", **reply["info"], "replica": reply["replica"]})
        pump = asyncio.create_task(self._pump())
        try:
            await self._receive()
        finally:
            self.done = True
            pump.cancel()
            for t in list(self._tasks):
                t.cancel()
            try:
                await self.backend.close(self.state.sid, "the page closed its connection")
            except ReplicaGone:
                pass

    def summary(self) -> dict:
        s = self.state
        return {"session": s.sid, "replica": s.replica, "moves": [m.as_dict() for m in s.moves], **s.counters}

    async def _open(self, first: bool, avoid: tuple[str, ...] = ()) -> dict | None:
        """Open the session on the least loaded replica that takes it; None (page told) if none does."""
        s, last = self.state, None
        for _ in range(OPEN_ATTEMPTS):
            try:
                reply = await self.backend.open(s.sid, s.source, s.steps, s.window, avoid=avoid)
            except ReplicaGone as e:
                last = {"error": "gone", "message": str(e)}
                await asyncio.sleep(0.2)
                continue
            if reply.get("ok"):
                s.replica = reply["replica"]
                self.live.set()
                return reply
            last = reply
            if reply.get("error") != "busy":
                break
            avoid = (*avoid, reply.get("replica", ""))
        if first:
            if last and last.get("error") == "busy":
                await self._send({"type": "busy", "message": last["message"]})
                await self._close(1013, "busy")
            else:
                await self._send({"type": "error", "message": (last or {}).get("message", "no replica answered")})
                await self._close(1011, "could not open a session")
        return None

    # ------------------------------------------------------------------------------ results
    async def _pump(self) -> None:
        """Forward the replica's results; move the session when its replica fails."""
        s = self.state
        while not self.done:
            reason, avoid = "the frame stream ended", ()
            try:
                async for item in self.backend.frames(s.sid):
                    kind = item["kind"]
                    if kind == "frame":
                        await self._on_result(item)
                    elif kind == "skip":
                        s.last_answered = max(s.last_answered, item["seq"])
                        s.counters["skips"] += 1
                        await self._send({"type": "skip", "seq": item["seq"], "reason": item["reason"]})
                    elif kind == "closed" and not item.get("failed"):
                        await self._send({"type": "closed", "reason": item["reason"]})
                        await self._close(1001, item["reason"])
                        return
                    else:  # unknown session, or the model failed on this replica
                        reason = item.get("reason", kind)
                        avoid = (s.replica,) if item.get("failed") else ()
                        break
            except ReplicaGone as e:
                reason = f"replica {s.replica} is gone: {str(e).splitlines()[0][:200]}"
            if self.done:
                return
            if not await self._move(reason, avoid):
                return

    async def _on_result(self, item: dict) -> None:
        s, head = self.state, item["header"]
        if head.get("session") != s.sid:  # never another session's frame
            s.counters["stray"] += 1
            log.error("dropped a frame of session %r on the relay of %r", head.get("session"), s.sid)
            return
        now = self.clock()
        move = s.moves[-1] if s.moves else None
        if move is not None and move.gap_ms is None and move.to_replica == s.replica:
            move.gap_ms = (now - s.last_frame_t) * 1e3 if s.last_frame_t is not None else None
            log.warning("session %s: first frame on %s, gap %.0f ms", s.sid, s.replica, move.gap_ms or -1)
        s.last_frame_t = now
        s.last_answered = max(s.last_answered, head["seq"])
        s.counters["frames_out"] += 1
        await self._send(pack(head, item["jpeg"]))

    async def _move(self, reason: str, avoid: tuple[str, ...]) -> bool:
        """Re-create the session on another replica; False (page told) if that fails in time."""
        s, t0 = self.state, self.clock()
        self.live.clear()
        move = Move(reason, s.replica or "?", lost=max(0, s.last_pushed - s.last_answered),
                    detect_ms=(t0 - s.last_frame_t) * 1e3 if s.last_frame_t is not None else 0.0)
        s.moves.append(move)
        log.warning("session %s: %s; moving it", s.sid, reason)
        deadline = t0 + self.cfg.recover_timeout_s
        reply = None
        while reply is None and self.clock() < deadline and not self.done:
            reply = await self._open(first=False, avoid=(*avoid, move.from_replica))
            if reply is None:
                await asyncio.sleep(0.5)
        if reply is None:
            if not self.done:
                msg = f"the session's replica failed and no other replica took it within {self.cfg.recover_timeout_s:.0f} s"
                await self._send({"type": "closed", "reason": msg})
                await self._close(1011, "no replica")
            return False
        move.to_replica, move.reopen_ms = s.replica, (self.clock() - t0) * 1e3
        await self._send({"type": "moved", "replica": s.replica, "reason": reason, "reopen_ms": round(move.reopen_ms),
                          "temporal_cache": "restarted"})
        stash, s.stash = s.stash, None
        settle = (stash[0] - 1) if stash else max(s.last_answered, s.last_pushed)
        if settle > 0:
            await self._send({"type": "skip", "seq": settle, "reason": "lost when the session moved to another replica"})
        if stash is not None:
            await self._push(*stash)
        return True

    # ------------------------------------------------------------------------------- inbound
    async def _receive(self) -> None:
        limit = RateLimit(self.web.max_rate)
        while not self.done:
            msg = await self.sock.receive()
            if msg is None:
                return
            if not limit.allow():
                if limit.over > self.web.max_rate:
                    await self._send({"type": "error", "message": f"over {self.web.max_rate:.0f} messages per second"})
                    await self._close(1008, "message rate over the limit")
                    return
                continue
            if isinstance(msg, bytes) and len(msg) > max(self.web.max_upload_bytes, self.web.max_frame_bytes) + 8192:
                await self._close(1009, "message too big")
                return
            try:
                await (self._on_text(msg) if isinstance(msg, str) else self._on_binary(msg))
            except (ProtocolError, ValueError) as e:
                await self._send({"type": "error", "message": str(e)})

    async def _on_text(self, data: str) -> None:
        m = parse_text(data)
        kind = m.get("type")
        if kind == "ping":
            await self._send({"type": "pong", "t": m.get("t")})
        elif kind == "reset":
            self._spawn(self._command("reset"))
        elif kind == "config":
            steps, window = m.get("steps"), m.get("window")
            if not all(v is None or isinstance(v, int) for v in (steps, window)):
                raise ProtocolError("config takes integer steps and window")
            self._spawn(self._command("config", steps, window))
        else:
            raise ProtocolError(f"unknown message type {kind!r}; expected ping, reset or config")

    async def _on_binary(self, data: bytes) -> None:
        header, payload = unpack(data)
        kind = header.get("kind")
        if kind == "frame":
            seq, t = header.get("seq"), header.get("t")
            if not isinstance(seq, int) or not isinstance(t, (int, float)):
                raise ProtocolError("a frame header needs an integer seq and a numeric t")
            self.state.counters["frames_in"] += 1
            if not self.live.is_set():
                self.state.stash = (seq, float(t), payload)
                self.state.counters["stashed"] += 1
                return
            await self._push(seq, float(t), payload)
        elif kind == "source":
            if self._source_busy:
                raise ProtocolError("a source upload is still being applied; wait for its answer")
            if len(payload) > self.web.max_upload_bytes:
                return await self._send({"type": "source", "ok": False, "message": f"source portrait of "
                                         f"{len(payload)} bytes is over the limit of {self.web.max_upload_bytes}: "
                                         "send a smaller file"})
            self._source_busy = True
            self._spawn(self._set_source(payload))
        else:
            raise ProtocolError(f"unknown binary message kind {kind!r}; expected frame or source")

    async def _push(self, seq: int, t: float, payload: bytes) -> None:
        s = self.state
        try:
            reply = await self.backend.push(s.sid, payload, t, seq)
        except ReplicaGone:
            s.stash = (seq, t, payload)  # the pump sees the failure too and moves the session
            return
        if reply.get("ok"):
            s.last_pushed = seq
        elif reply.get("error") == "bad_input":
            await self._send({"type": "skip", "seq": seq, "reason": reply["message"]})
        else:  # unknown/closed: the frame stream reports it and the pump moves or ends the session
            s.stash = (seq, t, payload)

    async def _set_source(self, payload: bytes) -> None:
        try:
            await self.live.wait()
            reply = await self.backend.set_source(self.state.sid, payload)
        except ReplicaGone as e:
            reply = {"error": "gone", "message": f"the replica went away; upload it again ({e})"}
        finally:
            self._source_busy = False
        if reply.get("ok"):
            self.state.source = payload
            await self._send({"type": "source", "ok": True})
        else:
            await self._send({"type": "source", "ok": False, "message": reply.get("message", "rejected")})

    async def _command(self, kind: str, steps: int | None = None, window: int | None = None) -> None:
        try:
            await self.live.wait()
            reply = await self.backend.command(self.state.sid, kind, steps, window)
        except ReplicaGone as e:
            reply = {"error": "gone", "message": f"the replica went away; try again ({e})"}
        if not reply.get("ok"):
            if reply.get("error") != "superseded":
                await self._send({"type": "error", "message": reply.get("message", f"{kind} failed")})
            return
        if kind == "config":
            self.state.steps, self.state.window = reply["steps"], reply["window"]
            await self._send({"type": "config", "ok": True, "steps": reply["steps"], "window": reply["window"],
                              "max_in_flight": reply["max_in_flight"]})
        else:
            await self._send({"type": "reset", "ok": True})

    # --------------------------------------------------------------------------------- out
    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, msg: Any) -> None:
        if self.sock is None:
            return
        try:
            await self.sock.send(msg if isinstance(msg, bytes) else json.dumps(msg))
        except (ConnectionError, RuntimeError):
            self.done = True

    async def _close(self, code: int, reason: str) -> None:
        self.done = True
        try:
            await self.sock.close(code, reason[:120])
        except (ConnectionError, RuntimeError):
            pass
