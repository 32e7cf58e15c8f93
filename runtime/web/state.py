"""Per-session state of the web server: the session record, its results, the host buffers.

Used by runtime/web/sessions.py (SessionManager); nothing here starts a thread.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.live.clock import StageClock
from runtime.live.pinned import PinnedRing
from runtime.live.slots import LatestSlot


class Busy(RuntimeError):
    """All sessions are taken; the message says how many and what to do."""


class SessionClosed(RuntimeError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UnknownSession(KeyError):
    pass


@dataclass
class FrameOut:
    """An animated frame for the page."""
    session: str
    seq: int               # the page's sequence number of the camera frame it animates
    t_client: float        # the page's timestamp of that frame, echoed
    jpeg: bytes
    face: bool             # a face was found in that frame (False: the last crop was held)
    server_ms: float       # receipt of the camera frame -> this frame encoded
    stages: dict[str, float]
    dropped: int           # the session's frames the server dropped so far


@dataclass
class Skip:
    """A camera frame that produced no animated frame, and why (no face yet, bad image)."""
    session: str
    seq: int
    reason: str


@dataclass
class InFrame:
    seq: int
    t_client: float
    data: bytes
    t_recv: float


@dataclass
class Ready:
    seq: int
    t_client: float
    t_recv: float
    pose: np.ndarray       # (R, R, 3) uint8
    local: np.ndarray      # (R, R, 3) uint8
    face: bool
    prep_ms: float


class SerializedLandmarker:
    """A landmarker shared by threads: one detect() at a time."""

    def __init__(self, landmarker):
        self.inner, self._lock = landmarker, threading.Lock()

    def detect(self, image):
        with self._lock:
            return self.inner.detect(image)


class Session:
    def __init__(self, sid: str, number: int, tracker, source: tuple, steps: int, window: int, now: float):
        self.id, self.number = sid, number
        self.inbox, self.ready, self.out = LatestSlot(), LatestSlot(), LatestSlot()
        self.tracker, self.tracker_lock = tracker, threading.Lock()
        self.source = source                  # ((R, R, 3) uint8, landmarks or None)
        self.steps, self.window = steps, window
        self.live = None                      # LiveSession; built and used by the device thread only
        self.commands: dict[str, tuple[Any, Future]] = {}
        self.created = self.last_active = now
        self.counters = {"frames_in": 0, "frames_out": 0, "no_face": 0, "bad_frames": 0}
        self.seq = 0
        self.closed_reason: str | None = None
        self.down: PinnedRing | None = None
        self.clocks: list[StageClock] = []

    def dropped(self) -> int:
        return self.inbox.dropped + self.ready.dropped + self.out.dropped

    def state_mib(self) -> float | None:
        """MiB of the session's own device state (the shared weights are not counted)."""
        memory = getattr(self.live, "memory", None)
        return round(memory()["total"] / 2**20, 2) if memory is not None else None
