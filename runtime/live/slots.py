"""A one-item hand-off between threads where the latest item wins.

`put` replaces an item nobody has taken yet and counts it as dropped, so a slow consumer sees only
the newest item and nothing queues up behind it: latency cannot grow with run time. With
`block=True` (rendering every frame of a file, tests) `put` waits for the consumer instead.
"""
from __future__ import annotations

import threading
from typing import Any, Callable


class Closed(Exception):
    """The slot was closed: the producer or consumer is shutting down."""


class LatestSlot:
    def __init__(self, block: bool = False, on_drop: Callable[[Any], None] | None = None):
        self._cv = threading.Condition()
        self._item: Any = None
        self._full = False
        self._closed = False
        self.block, self.on_drop = block, on_drop
        self.dropped = 0

    def put(self, item: Any) -> None:
        with self._cv:
            if self.block:
                while self._full and not self._closed:
                    self._cv.wait(0.1)
            if self._closed:
                raise Closed
            old, had = self._item, self._full
            self._item, self._full = item, True
            if had:
                self.dropped += 1
            self._cv.notify_all()
        if had and self.on_drop is not None:
            self.on_drop(old)

    def get(self, timeout: float | None = None) -> Any:
        """The newest item, or None after `timeout` seconds; raises Closed once closed and empty."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._full or self._closed, timeout):
                return None
            if not self._full:
                raise Closed
            item, self._item, self._full = self._item, None, False
            self._cv.notify_all()
            return item

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
