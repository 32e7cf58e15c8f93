"""Several live sessions on one model, fairly scheduled, with no HTTP in sight.

    manager = SessionManager(live, WebConfig(), default_source=(image, landmarks)).start()
    sid = manager.open()                          # Busy beyond WebConfig.max_sessions
    manager.push(sid, jpeg_bytes, t_client, seq)  # never blocks; the latest frame wins
    out = manager.poll(sid, timeout=1.0)          # FrameOut | Skip | None; SessionClosed when gone
    manager.set_source(sid, png_bytes); manager.reset(sid); manager.configure(sid, steps=1, window=3)
    manager.close(sid); manager.stats(); manager.stop()

One LiveModel (the graphs, shared) serves up to `max_sessions` LiveSessions, each with its own
source, face tracker, temporal caches and counters. Each session has three one-item slots where
the latest item wins (runtime/live/slots.py): inbox (encoded frame) -> ready (hints) -> out. Two
threads serve all sessions:

* prepare: decodes a frame and runs the session's face tracker (CPU work);
* device: the only thread that touches the model. It applies queued commands (new steps/window,
  new source, reset), then runs one frame of the next session that has one.

Both pick sessions round-robin, starting after the session served last, so a session with a frame
waiting is served within one turn of every other session, however fast another one sends. A slow
model or link drops frames (counted); nothing queues. On CUDA the device thread uploads through
page-locked buffers and downloads into them with an event per frame; the only waits are for work
two frames old (to bound the work in flight) and the poller's wait on its own frame.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

import numpy as np
import torch

from runtime.live.clock import StageClock
from runtime.live.pinned import PinnedRing
from runtime.live.slots import Closed, LatestSlot
from runtime.live.transfer import DeviceFrames
from runtime.web.config import WebConfig
from runtime.web.images import ImageError, check_image, decode_image, encode_jpeg
from runtime.web.state import (
    Busy,
    FrameOut,
    InFrame,
    Ready,
    SerializedLandmarker,
    Session,
    SessionClosed,
    Skip,
    UnknownSession,
)

__all__ = ["Busy", "FrameOut", "SessionClosed", "SessionManager", "Skip", "UnknownSession"]
log = logging.getLogger(__name__)
FRAME_FORMATS = ("jpeg", "webp")
_COMMAND_ORDER = ("config", "source", "reset")
_RING = 4  # download buffers per session: device writes one, the slot holds one, the poller reads one


class SessionManager:
    """Owns one LiveModel and its sessions. Thread-safe; every method but poll returns at once
    (set_source waits until the new source is live, or `timeout`)."""

    def __init__(self, live, web: WebConfig, default_source: tuple[np.ndarray, Any], landmarker=None,
                 tracker_factory: Callable[[Any], Callable] | None = None):
        self.live, self.web = live, web.validated()
        self.size = live.cfg.image_size()
        self.device = torch.device(live.cfg.device)
        self.default_source = default_source
        self._landmarker = SerializedLandmarker(landmarker) if landmarker is not None else None
        self._tracker_factory = tracker_factory or self._face_tracker
        self._cv = threading.Condition()
        self._sessions: dict[str, Session] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()
        self._numbers = 0
        self._last = {"prepare": -1, "device": -1}
        self.counters = {"opened": 0, "closed": 0, "busy": 0, "frames_out": 0}
        self.device_busy_s = 0.0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._frames = DeviceFrames(self.device, self.size)  # uploads, session step, downloads (runtime/live)
        self.options = self._options()

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> "SessionManager":
        for fn, name in ((self._prepare_loop, "prepare"), (self._device_loop, "device")):
            t = threading.Thread(target=fn, name=f"web-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for sid in list(self._sessions):
            self.close(sid, "the server is shutting down")
        with self._cv:
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)

    # ------------------------------------------------------------------------------------ API
    def open(self, session_id: str | None = None, source: bytes | None = None) -> str:
        """A new session (with its own source if given). Raises Busy when all are taken."""
        prepared = self._prepare_source(source) if source is not None else self.default_source
        sid = session_id or secrets.token_urlsafe(12)
        cfg = self.live.cfg
        with self._cv:
            if sid in self._sessions:
                raise ValueError(f"session {sid!r} is already open")
            if len(self._sessions) >= self.web.max_sessions:
                self.counters["busy"] += 1
                raise Busy(f"busy: all {self.web.max_sessions} sessions are in use; try again later "
                           "(the server's --max-sessions sets the limit)")
            self._numbers += 1
            s = Session(sid, self._numbers, self._tracker_factory(prepared[1]), prepared, cfg.steps, cfg.window,
                         time.monotonic())
            self._sessions[sid] = s
            self.counters["opened"] += 1
        self._submit(s, "config", (cfg.steps, cfg.window))  # builds the LiveSession on the device thread
        return sid

    def push(self, session_id: str, data: bytes, t_client: float, seq: int | None = None) -> int:
        """Queue a camera frame (JPEG/WebP); replaces one not yet taken. Returns its seq.
        Raises ImageError at once for an oversized or unreadable header."""
        s = self._get(session_id)
        check_image(data, self.web.max_frame_bytes, self.web.max_frame_side ** 2, self.web.max_frame_side,
                    FRAME_FORMATS, "camera frame")
        s.seq = s.seq + 1 if seq is None else int(seq)
        s.last_active = time.monotonic()
        s.counters["frames_in"] += 1
        try:
            s.inbox.put(InFrame(s.seq, float(t_client), data, time.perf_counter()))
        except Closed:
            raise SessionClosed(s.closed_reason or "closed") from None
        with self._cv:
            self._cv.notify_all()
        return s.seq

    def poll(self, session_id: str, timeout: float = 1.0) -> FrameOut | Skip | None:
        """The session's newest result, waiting up to `timeout` s (None if nothing came)."""
        s = self._get(session_id)
        try:
            item = s.out.get(timeout)
        except Closed:
            raise SessionClosed(s.closed_reason or "closed") from None
        if item is None or isinstance(item, Skip):
            return item
        j, ready, clock = item
        if s.down.cuda:
            s.down.events[j].synchronize()
        image = s.down.bufs[j].numpy().copy()
        stages = {"prepare": ready.prep_ms, **clock.read()}
        jpeg = encode_jpeg(image, self.web.jpeg_quality)
        return FrameOut(s.id, ready.seq, ready.t_client, jpeg, ready.face,
                        (time.perf_counter() - ready.t_recv) * 1e3, stages, s.dropped())

    def set_source(self, session_id: str, data: bytes, timeout: float = 120.0) -> None:
        """Decode (bounded), crop around the face, and make it the session's source; waits until the
        device thread has applied it. Raises ImageError or NoFaceError (both ValueError)."""
        s = self._get(session_id)
        s.last_active = time.monotonic()
        prepared = self._prepare_source(data)
        try:
            self._submit(s, "source", prepared).result(timeout)
        except CancelledError:
            raise SessionClosed(s.closed_reason or "superseded by a newer source") from None
        except FutureTimeout:
            raise TimeoutError(f"the new source was not applied within {timeout:.0f} s") from None

    def reset(self, session_id: str) -> Future:
        """Forget the temporal history before the next frame (the source stays)."""
        s = self._get(session_id)
        s.last_active = time.monotonic()
        return self._submit(s, "reset", None)

    def configure(self, session_id: str, steps: int | None = None, window: int | None = None) -> Future:
        """New steps/window for this session (one of self.options); rebuilt before its next frame."""
        s = self._get(session_id)
        steps = s.steps if steps is None else int(steps)
        window = s.window if window is None else int(window)
        if steps not in self.options["steps"] or window not in self.options["window"]:
            raise ValueError(f"steps {steps}, window {window}: this server allows steps "
                             f"{list(self.options['steps'])} and window {list(self.options['window'])}")
        s.last_active = time.monotonic()
        return self._submit(s, "config", (steps, window))

    def close(self, session_id: str, reason: str = "closed") -> None:
        """Free the session (a closed tab, a dropped socket, the idle timeout). Idempotent."""
        with self._cv:
            s = self._sessions.pop(session_id, None)
            if s is None:
                return
            s.closed_reason = reason
            self._closed[session_id] = reason
            while len(self._closed) > 256:
                self._closed.popitem(last=False)
            commands, s.commands = s.commands, {}
            self.counters["closed"] += 1
            self._cv.notify_all()
        for slot in (s.inbox, s.ready, s.out):
            slot.close()
        for _, fut in commands.values():
            fut.cancel()
        log.info("session %s closed: %s", session_id, reason)

    def info(self, session_id: str) -> dict:
        """What the page needs to know about its session."""
        s = self._get(session_id)
        extra = s.steps - 1 if self.live.cfg.stream_batch else 0
        return {"session": s.id, "steps": s.steps, "window": s.window, "resolution": self.size,
                "options": {k: list(v) for k, v in self.options.items()},
                "random_weights": bool(getattr(self.live, "random_weights", False)),
                "max_in_flight": self.web.max_in_flight + extra, "capture_side": self.web.capture_side,
                "limits": {"frame_bytes": self.web.max_frame_bytes, "upload_bytes": self.web.max_upload_bytes,
                           "rate": self.web.max_rate, "idle_timeout": self.web.idle_timeout}}

    def stats(self) -> dict:
        now = time.monotonic()
        with self._cv:
            sessions = list(self._sessions.values())
            out = {"sessions": len(sessions), "max_sessions": self.web.max_sessions, **self.counters,
                   "device_busy_s": round(self.device_busy_s, 3)}
        out["detail"] = [{"id": s.id, "age_s": round(now - s.created, 1), "idle_s": round(now - s.last_active, 1),
                          "steps": s.steps, "window": s.window, "dropped": s.dropped(), **s.counters,
                          "state_mib": s.state_mib()} for s in sessions]
        return out

    # ----------------------------------------------------------------------------- internals
    def _get(self, sid: str) -> Session:
        with self._cv:
            s = self._sessions.get(sid)
            if s is not None:
                return s
            if sid in self._closed:
                raise SessionClosed(self._closed[sid])
        raise UnknownSession(f"no session {sid!r}")

    def _submit(self, s: Session, kind: str, payload: Any) -> Future:
        fut: Future = Future()
        with self._cv:
            if s.closed_reason is not None:
                raise SessionClosed(s.closed_reason)
            old = s.commands.get(kind)
            s.commands[kind] = (payload, fut)
            self._cv.notify_all()
        if old is not None:
            old[1].cancel()  # superseded before it ran
        return fut

    def _options(self) -> dict[str, tuple[int, ...]]:
        cfg = self.live.cfg
        fixed_window = getattr(getattr(self.live, "graphs", None), "window", None)
        if cfg.backend in ("ort", "trt") or cfg.sampler not in ("lcm", "tcd"):
            steps = (cfg.steps,)  # exported graphs and DDIM: the server's choice only
        else:
            steps = tuple(sorted({1, 2, 3, 4, cfg.steps}))
        window = (fixed_window,) if fixed_window is not None else tuple(sorted({0, 1, 3, 7, 15, cfg.window}))
        return {"steps": steps, "window": window}

    def _prepare_source(self, data: bytes) -> tuple[np.ndarray, Any]:
        from runtime.preprocess import prepare_source
        rgb = decode_image(data, self.web.max_upload_bytes, self.web.max_upload_pixels, what="source portrait")
        if self._landmarker is None:
            from runtime.landmarks import default_landmarker
            self._landmarker = SerializedLandmarker(default_landmarker())
        return prepare_source(rgb, self.size, self._landmarker)

    def _face_tracker(self, source_landmarks):
        from runtime.live.tracking import FaceTracker
        if self._landmarker is None:
            from runtime.landmarks import default_landmarker
            self._landmarker = SerializedLandmarker(default_landmarker())
        return FaceTracker(self.size, source_landmarks, landmarker=self._landmarker,
                           detect_every=self.web.detect_every, reframe=self.web.reframe)

    def _take(self, stage: str, slot: Callable[[Session], LatestSlot | None]) -> tuple[Session | None, Any]:
        """Round-robin: the first session after the last one served whose slot has an item."""
        with self._cv:
            order = sorted(self._sessions.values(), key=lambda s: s.number)
            last = self._last[stage]
            order = [s for s in order if s.number > last] + [s for s in order if s.number <= last]
            for s in order:
                box = slot(s)
                if box is None:
                    continue
                try:
                    item = box.get(timeout=0)
                except Closed:
                    continue
                if item is not None:
                    self._last[stage] = s.number
                    return s, item
            self._cv.wait(0.25)
        return None, None

    # ------------------------------------------------------------------------------- threads
    def _prepare_loop(self) -> None:
        while not self._stop.is_set():
            s, frame = self._take("prepare", lambda s: s.inbox)
            if s is not None:
                self._prepare(s, frame)

    def _prepare(self, s: Session, frame: InFrame) -> None:
        """Decode a camera frame and track the face: hints into the session's ready slot."""
        t0 = time.perf_counter()
        try:
            side = self.web.max_frame_side
            rgb = decode_image(frame.data, self.web.max_frame_bytes, side * side, side, FRAME_FORMATS,
                               "camera frame")
            with s.tracker_lock:
                hints = s.tracker(rgb, frame.t_recv)
        except ImageError as e:
            s.counters["bad_frames"] += 1
            return self._put(s.out, Skip(s.id, frame.seq, str(e)))
        if hints is None or not hints.face:
            s.counters["no_face"] += 1
        if hints is None:
            return self._put(s.out, Skip(s.id, frame.seq, "no face found yet: look into the camera"))
        ready = Ready(frame.seq, frame.t_client, frame.t_recv, hints.pose, hints.local, bool(hints.face),
                      (time.perf_counter() - t0) * 1e3)
        if self._put(s.ready, ready):
            with self._cv:
                self._cv.notify_all()

    @staticmethod
    def _put(slot: LatestSlot, item: Any) -> bool:
        try:
            slot.put(item)
            return True
        except Closed:  # the session was closed meanwhile
            return False

    def _device_loop(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(stream):  # None: a no-op
            next_reap = 0.0
            while not self._stop.is_set():
                if time.monotonic() >= next_reap:
                    self._reap_idle()
                    next_reap = time.monotonic() + 0.5
                with self._cv:
                    pending = [s for s in self._sessions.values() if s.commands]
                for s in pending:
                    self._apply_commands(s)
                s, ready = self._take("device", lambda s: s.ready if s.live is not None else None)
                if s is not None:
                    self._run_frame(s, ready)

    def _reap_idle(self) -> None:
        now = time.monotonic()
        with self._cv:
            idle = [s.id for s in self._sessions.values() if now - s.last_active > self.web.idle_timeout]
        for sid in idle:
            self.close(sid, f"idle for {self.web.idle_timeout:.0f} s: reload the page to start again")

    def _apply_commands(self, s: Session) -> None:
        with self._cv:
            commands, s.commands = s.commands, {}
        for kind in _COMMAND_ORDER:
            if kind not in commands:
                continue
            payload, fut = commands[kind]
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._command(s, kind, payload))
            except Exception as e:  # noqa: BLE001 - the caller gets it through the future
                fut.set_exception(e)
                if s.live is None:  # the session could not be built: it cannot serve frames
                    self.close(s.id, f"the session could not start: {e}")

    def _command(self, s: Session, kind: str, payload: Any) -> Any:
        """Runs on the device thread, between frames."""
        if kind == "config":
            s.steps, s.window = payload
            live = self.live.new_session(steps=s.steps, window=s.window)
            live.set_source(torch.from_numpy(np.ascontiguousarray(s.source[0])))
            s.live = live
            if s.down is None:
                s.down = PinnedRing((self.size, self.size, 3), self.device, _RING)
                s.clocks = [StageClock(self.device) for _ in range(_RING)]
            return {"steps": s.steps, "window": s.window}
        if kind == "source":
            s.source = payload
            s.live.set_source(torch.from_numpy(np.ascontiguousarray(payload[0])))
            with s.tracker_lock:
                if hasattr(s.tracker, "set_source"):
                    s.tracker.set_source(payload[1])
            return True
        s.live.reset()
        return True

    def _run_frame(self, s: Session, ready: Ready) -> None:
        t0 = time.perf_counter()
        clock = s.clocks[s.counters["frames_out"] % len(s.clocks)]
        clock.start()
        try:
            done = self._frames.run(s.live, ready.pose, ready.local, ready, clock, s.down)
        except Exception as e:  # noqa: BLE001 - one session's failure must not stop the others
            log.exception("session %s: the model failed", s.id)
            return self.close(s.id, f"the model failed on this session's frame: {e}")
        if done is not None:  # None: a stream batch filling up
            s.counters["frames_out"] += 1
            self.counters["frames_out"] += 1
            self._put(s.out, (done[0], done[1], clock))
        self.device_busy_s += time.perf_counter() - t0
