"""One model replica: a SessionManager over its own LiveModel, a bounded number of sessions.

    host = SessionHost(manager, ServeConfig(), name="r1")     # no Ray: tests drive this directly
    await host.open(sid, source=None, steps=None, window=None) # {"ok": True, "info": ..., "replica": "r1"}
    await host.push(sid, jpeg, t, seq)                         # {"ok": True} | {"error": ..., "message": ...}
    async for item in host.frames(sid): ...                    # {"kind": "frame" | "skip" | "closed" | "unknown"}

`LiveReplica` is the Ray Serve deployment class around a SessionHost (app.py applies
`serve.deployment` to it with the replica count, GPUs and the session router). Every method answers
with a plain dict: expected failures (busy, unknown session, bad image) are replies, not exceptions,
so they cross Ray unchanged; only a dead or unreachable replica shows up as an exception at the
caller (relay.py turns that into moving the session).

Admission keeps old sessions safe: a new session is refused (a "busy" reply, never an eviction)
when the replica holds `max_sessions`, when a new session's memory would not fit above
`memory_reserve_mib` of free GPU memory, or for `oom_cooldown_s` after building one ran out of memory.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

import torch

from runtime.serve.config import ServeConfig, resolve
from runtime.web.sessions import Busy, FrameOut, SessionClosed, SessionManager, UnknownSession

log = logging.getLogger(__name__)
MODEL_FAILED = "the model failed"  # runtime/web/sessions.py closes a session with this reason prefix
MiB = 2 ** 20


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


class SessionHost:
    """The sessions of one replica behind async methods with dict replies; no Ray, no HTTP."""

    def __init__(self, manager: SessionManager, cfg: ServeConfig, name: str,
                 free_mib: Callable[[], float | None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.manager, self.cfg, self.name = manager, cfg, name
        self.free_mib = free_mib or (lambda: None)
        self.clock = clock
        self.pool = ThreadPoolExecutor(max_workers=2 * manager.web.max_sessions + 4, thread_name_prefix="serve-poll")
        self.oom_until = 0.0
        self.counters = {"opened": 0, "refused": 0, "oom": 0, "unknown": 0}

    # ------------------------------------------------------------------------------- sessions
    def refusal(self) -> str | None:
        """Why a new session would be refused now, or None."""
        m = self.manager
        if len(m._sessions) >= m.web.max_sessions:
            return f"replica {self.name} holds its maximum of {m.web.max_sessions} sessions"
        if self.clock() < self.oom_until:
            return f"replica {self.name} ran out of GPU memory {self.cfg.oom_cooldown_s:.0f} s ago or less"
        free = self.free_mib()
        if free is not None:
            need = self.session_mib()
            if free - need < self.cfg.memory_reserve_mib:
                return (f"replica {self.name} has {free:.0f} MiB of GPU memory free; a session needs about "
                        f"{need:.0f} MiB and {self.cfg.memory_reserve_mib:.0f} MiB stay in reserve")
        return None

    def session_mib(self) -> float:
        """Memory of one more session: the configured figure, else the largest session seen here."""
        if self.cfg.session_mib is not None:
            return self.cfg.session_mib
        seen = [d["state_mib"] for d in self.manager.stats()["detail"] if d.get("state_mib") is not None]
        return max(seen, default=0.0)

    async def open(self, sid: str, source: bytes | None = None, steps: int | None = None,
                   window: int | None = None, avoid: tuple[str, ...] = ()) -> dict:
        """A new session with this id (the relay chooses ids, so a moved session keeps its id).
        `avoid` is read by the router only."""
        why = self.refusal()
        if why is not None:
            self.counters["refused"] += 1
            return self._busy(why)
        loop = asyncio.get_running_loop()
        try:  # a source upload is decoded and face-cropped: off the event loop
            sid = await loop.run_in_executor(self.pool, self.manager.open, sid, source)
        except Busy as e:
            self.counters["refused"] += 1
            return self._busy(str(e))
        except ValueError as e:  # ImageError / NoFaceError / duplicate id
            return {"error": "bad_input", "message": str(e), "replica": self.name}
        try:  # supersedes open()'s own build command, so the session is built once, and we wait for it
            await asyncio.wrap_future(self.manager.configure(sid, steps, window))
        except Exception as e:  # noqa: BLE001 - reported as a reply
            self.manager.close(sid, f"could not start: {e}")
            if is_oom(e):
                self.counters["oom"] += 1
                self.oom_until = self.clock() + self.cfg.oom_cooldown_s
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                return self._busy(f"replica {self.name} is out of GPU memory: {e}")
            return {"error": "failed", "message": f"the session could not start: {e}", "replica": self.name}
        self.counters["opened"] += 1
        return {"ok": True, "info": self.manager.info(sid), "replica": self.name}

    def _busy(self, message: str) -> dict:
        return {"error": "busy", "message": message, "replica": self.name}

    async def push(self, sid: str, data: bytes, t: float, seq: int | None = None) -> dict:
        """Never blocks (the latest frame wins inside the manager)."""
        try:
            return {"ok": True, "seq": self.manager.push(sid, data, t, seq)}
        except SessionClosed as e:
            return {"error": "closed", "message": e.reason}
        except UnknownSession:
            self.counters["unknown"] += 1
            return {"error": "unknown", "message": f"replica {self.name} has no session {sid!r}"}
        except ValueError as e:  # ImageError: a bad frame header
            return {"error": "bad_input", "message": str(e), "seq": seq}

    async def frames(self, sid: str) -> AsyncIterator[dict]:
        """The session's results until it closes: one long-lived streaming call per session."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                out = await loop.run_in_executor(self.pool, self.manager.poll, sid, 0.5)
            except SessionClosed as e:
                yield {"kind": "closed", "reason": e.reason, "failed": e.reason.startswith(MODEL_FAILED)}
                return
            except UnknownSession:
                self.counters["unknown"] += 1
                yield {"kind": "unknown", "reason": f"replica {self.name} has no session {sid!r}"}
                return
            if out is None:
                continue
            if isinstance(out, FrameOut):
                yield {"kind": "frame", "jpeg": out.jpeg, "header": {
                    "kind": "frame", "session": out.session, "seq": out.seq, "t": out.t_client, "face": out.face,
                    "server_ms": round(out.server_ms, 1), "dropped": out.dropped, "replica": self.name,
                    "stages": {k: round(v, 1) for k, v in out.stages.items()}}}
            else:
                yield {"kind": "skip", "seq": out.seq, "reason": out.reason}

    async def set_source(self, sid: str, data: bytes) -> dict:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.pool, self.manager.set_source, sid, data)
            return {"ok": True}
        except (SessionClosed, UnknownSession) as e:
            return {"error": "closed", "message": str(e)}
        except (ValueError, TimeoutError) as e:
            return {"error": "bad_input", "message": str(e)}

    async def command(self, sid: str, kind: str, steps: int | None = None, window: int | None = None) -> dict:
        """kind: reset | config. Waits until the device thread has applied it."""
        try:
            if kind == "reset":
                await asyncio.wrap_future(self.manager.reset(sid))
                return {"ok": True}
            if kind == "config":
                result = await asyncio.wrap_future(self.manager.configure(sid, steps, window))
                return {"ok": True, **result, "max_in_flight": self.manager.info(sid)["max_in_flight"]}
        except (SessionClosed, UnknownSession) as e:
            return {"error": "closed", "message": str(e)}
        except asyncio.CancelledError:
            return {"error": "superseded", "message": f"{kind} was superseded by a newer one"}
        except ValueError as e:
            return {"error": "bad_input", "message": str(e)}
        return {"error": "bad_input", "message": f"unknown command {kind!r}; expected reset or config"}

    async def close(self, sid: str, reason: str = "closed") -> dict:
        self.manager.close(sid, reason)
        return {"ok": True}

    # ---------------------------------------------------------------------------------- load
    def load(self) -> dict:
        """What the session router reads (RunningReplica.routing_stats)."""
        with self.manager._cv:
            ids = list(self.manager._sessions)
        why = self.refusal()
        return {"sessions": ids, "count": len(ids), "max": self.manager.web.max_sessions,
                "accepting": why is None, "refusal": why}

    def stats(self) -> dict:
        return {"replica": self.name, **self.load(), "host": dict(self.counters), "manager": self.manager.stats()}

    def check(self) -> None:
        """Raises when the device or prepare thread has died (Serve then replaces the replica)."""
        dead = [t.name for t in self.manager._threads if not t.is_alive()]
        if dead and not self.manager._stop.is_set():
            raise RuntimeError(f"replica {self.name}: thread(s) {', '.join(dead)} died")

    def stop(self) -> None:
        self.manager.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


def cuda_free_mib(device: torch.device) -> Callable[[], float]:
    def free() -> float:
        return torch.cuda.mem_get_info(device)[0] / MiB
    return free


class LiveReplica:
    """The Ray Serve deployment: builds its LiveModel from the deployment dict (config.py) on the
    device Ray gave it (num_gpus=1: that GPU is cuda:0 here), then serves a SessionHost."""

    def __init__(self, spec: dict):
        from ray import serve

        from runtime.landmarks import default_landmarker
        from runtime.live.factory import load_live
        from runtime.preprocess import prepare_source
        from runtime.video_io import read_image
        from runtime.webcam import SAMPLE_SOURCE
        serve_cfg, live_cfg, web_cfg, model = resolve(spec)
        torch.set_num_threads(serve_cfg.torch_threads())
        live_cfg = live_cfg.validated()
        t0 = time.perf_counter()
        live = load_live(live_cfg, checkpoint=model.get("checkpoint"), taesd=model.get("taesd"),
                         lora=model.get("lora"), engines=model.get("engines"))
        landmarker = default_landmarker()
        source = prepare_source(read_image(model.get("source") or SAMPLE_SOURCE), live_cfg.image_size(), landmarker)
        manager = SessionManager(live, web_cfg, source, landmarker).start()
        device = torch.device(live_cfg.device)
        name = serve.get_replica_context().replica_id.unique_id
        self.host = SessionHost(manager, serve_cfg, name, cuda_free_mib(device) if device.type == "cuda" else None)
        log.warning("replica %s ready in %.1f s: %s on %s", name, time.perf_counter() - t0, live_cfg.preset,
                    live_cfg.device)

    async def open(self, sid: str, source: bytes | None = None, steps: int | None = None,
                   window: int | None = None, avoid: tuple[str, ...] = ()) -> dict:
        return await self.host.open(sid, source, steps, window, avoid)

    async def push(self, sid: str, data: bytes, t: float, seq: int | None = None) -> dict:
        return await self.host.push(sid, data, t, seq)

    async def frames(self, sid: str):
        async for item in self.host.frames(sid):
            yield item

    async def set_source(self, sid: str, data: bytes) -> dict:
        return await self.host.set_source(sid, data)

    async def command(self, sid: str, kind: str, steps: int | None = None, window: int | None = None) -> dict:
        return await self.host.command(sid, kind, steps, window)

    async def close(self, sid: str, reason: str = "closed") -> dict:
        return await self.host.close(sid, reason)

    async def stats(self, _sid: str = "") -> dict:
        import ray
        return {**self.host.stats(), "actor": ray.get_runtime_context().get_actor_name()}

    def record_routing_stats(self) -> dict:
        return self.host.load()

    def check_health(self) -> None:
        self.host.check()

    def __del__(self):
        host = getattr(self, "host", None)
        if host is not None:
            host.stop()
