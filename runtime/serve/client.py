"""A synthetic page: plays a video file as a camera over the page's WebSocket protocol, and checks
every frame it gets back.

    frames = camera_frames("samples/driving.mp4", side=256)         # JPEG bytes, looped
    result = asyncio.run(play("http://127.0.0.1:8000/", frames, seconds=20, marker=1))

It behaves like runtime/web/static/app.js: a capture tick every 1/fps s, at most `max_in_flight`
frames unanswered (the server says how many), an answer for frame n settles every earlier one, and
a frame unanswered for 10 s is given up. Each client's sequence numbers start at marker * 10**6, and
the page timestamp it sends is echoed back, so a frame counts as its own only if the header names its
session and carries one of its own (seq, t) pairs: anything else is a stray (another session's frame).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.web.protocol import pack, unpack

STALE_S = 10.0


def camera_frames(path: str | Path, side: int = 256, quality: int = 80, limit: int = 90) -> list[bytes]:
    """The video's frames, resized to `side` on the longer edge, as JPEG bytes."""
    import cv2

    from runtime.video_io import read_video
    from runtime.web.images import encode_jpeg
    out = []
    for rgb in read_video(path).frames[:limit]:
        rgb = np.asarray(rgb)
        h, w = rgb.shape[:2]
        s = side / max(h, w)
        out.append(encode_jpeg(cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA), quality))
    if not out:
        raise ValueError(f"{path}: no frames")
    return out


@dataclass
class ClientResult:
    marker: int
    session: str | None = None
    replicas: list[str] = field(default_factory=list)  # the hello's replica, then each move's
    sent: int = 0
    received: int = 0
    skipped: int = 0
    expired: int = 0
    stray: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    outside_ms: list[float] = field(default_factory=list)  # latency minus the replica's own time (server_ms)
    arrivals: list[float] = field(default_factory=list)   # monotonic s
    moves: list[dict] = field(default_factory=list)        # "moved" messages, with the time they came
    sent_at: dict[int, float] = field(default_factory=dict)  # seq -> monotonic s
    animated: set[int] = field(default_factory=set)        # seqs that came back animated
    closed: str | None = None                              # why the server ended the session, if it did
    busy: str | None = None
    t_start: float = 0.0
    t_end: float = 0.0

    def fps(self) -> float:
        span = self.t_end - self.t_start
        return self.received / span if span > 0 else 0.0

    def gap_after(self, t: float) -> float | None:
        """Seconds between the last frame before t and the first frame after it (None: none after)."""
        before = [a for a in self.arrivals if a <= t]
        after = [a for a in self.arrivals if a > t]
        if not after:
            return None
        return after[0] - (before[-1] if before else t)

    def lost_between(self, t0: float, t1: float) -> int:
        """Frames sent in [t0, t1) that never came back animated."""
        return sum(1 for s, t in self.sent_at.items() if t0 <= t < t1 and s not in self.animated)

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms)
        return {"marker": self.marker, "session": self.session, "replicas": self.replicas, "sent": self.sent,
                "received": self.received, "fps": round(self.fps(), 2), "skipped": self.skipped,
                "not_animated": self.sent - self.received, "stray": self.stray,
                "moves": [{k: v for k, v in m.items() if k != "at"} for m in self.moves], "closed": self.closed,
                "busy": self.busy, "p50_ms": round(percentile(lat, 50), 1) if lat else None,
                "p99_ms": round(percentile(lat, 99), 1) if lat else None}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    k = max(0, min(len(sorted_values) - 1, int(np.ceil(q / 100 * len(sorted_values))) - 1))
    return sorted_values[k]


def ws_url(page_url: str) -> str:
    base, _, query = page_url.partition("?")
    base = base.replace("https://", "wss://").replace("http://", "ws://").rstrip("/") + "/ws"
    return base + (f"?{query}" if query else "")


async def play(page_url: str, frames: list[bytes], seconds: float, marker: int, fps: float = 30.0,
               connect_timeout: float = 60.0, result: ClientResult | None = None) -> ClientResult:
    """One session for `seconds` (after its hello). Never raises for server-side endings: see the
    result (pass `result` to watch it while it runs)."""
    import aiohttp
    res = result or ClientResult(marker)
    sent_t: dict[int, float] = {}
    pending: dict[int, float] = {}
    state = {"max_in_flight": 2, "stop": False}
    clock0 = time.monotonic()

    def now_ms() -> float:
        return (time.monotonic() - clock0) * 1e3

    def settle(seq: int) -> None:
        for k in [k for k in pending if k <= seq]:
            del pending[k]

    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(page_url), max_msg_size=16 << 20, timeout=aiohttp.ClientWSTimeout(
                ws_close=5.0), receive_timeout=None, heartbeat=None) as ws:
            hello = await asyncio.wait_for(ws.receive(), connect_timeout)
            msg = json.loads(hello.data) if hello.type == aiohttp.WSMsgType.TEXT else {}
            if msg.get("type") != "hello":
                res.busy = msg.get("message", f"no hello: {msg or hello.type}")
                return res
            res.session, state["max_in_flight"] = msg["session"], msg["max_in_flight"]
            res.replicas.append(msg.get("replica"))
            res.t_start = time.monotonic()

            async def sender():
                k = 0
                while not state["stop"] and time.monotonic() - res.t_start < seconds:
                    await asyncio.sleep(1 / fps)
                    t = now_ms()
                    for seq in [s for s, t0 in pending.items() if t - t0 > STALE_S * 1e3]:
                        del pending[seq]
                        res.expired += 1
                    if len(pending) >= state["max_in_flight"]:
                        continue
                    seq = marker * 10**6 + k
                    k += 1
                    pending[seq] = sent_t[seq] = t
                    res.sent_at[seq] = time.monotonic()
                    await ws.send_bytes(pack({"kind": "frame", "seq": seq, "t": t}, frames[k % len(frames)]))
                    res.sent += 1
                state["stop"] = True

            async def receiver():
                async for m in ws:
                    if m.type == aiohttp.WSMsgType.BINARY:
                        head, _jpeg = unpack(m.data)
                        seq = head.get("seq")
                        if head.get("session") != res.session or seq not in sent_t or head.get("t") != sent_t[seq]:
                            res.stray += 1
                            continue
                        res.received += 1
                        res.arrivals.append(time.monotonic())
                        res.latencies_ms.append(now_ms() - sent_t[seq])
                        res.outside_ms.append(res.latencies_ms[-1] - float(head.get("server_ms", 0.0)))
                        res.animated.add(seq)
                        settle(seq)
                    elif m.type == aiohttp.WSMsgType.TEXT:
                        t = json.loads(m.data)
                        if t.get("type") == "skip":
                            res.skipped += 1
                            settle(t["seq"])
                        elif t.get("type") == "moved":
                            res.moves.append({**t, "at": time.monotonic()})
                            res.replicas.append(t.get("replica"))
                        elif t.get("type") == "closed":
                            res.closed = t.get("reason")
                    else:
                        break

            send_task, recv_task = asyncio.create_task(sender()), asyncio.create_task(receiver())
            await asyncio.wait({send_task, recv_task}, return_when=asyncio.FIRST_COMPLETED)
            drain = time.monotonic() + 5.0  # the answers to the last frames sent
            while pending and not recv_task.done() and time.monotonic() < drain:
                await asyncio.sleep(0.05)
            state["stop"] = True
            res.t_end = time.monotonic()
            send_task.cancel()
            await ws.close()
            try:
                await asyncio.wait_for(recv_task, 10.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                recv_task.cancel()
    return res


def latency_stats(results: list[ClientResult]) -> dict:
    lat = sorted(x for r in results for x in r.latencies_ms)
    outside = sorted(x for r in results for x in r.outside_ms)
    fps = [r.fps() for r in results if r.session]
    return {"sessions": len(results), "fps_mean": round(statistics.fmean(fps), 2) if fps else 0.0,
            "fps_min": round(min(fps), 2) if fps else 0.0,
            "p50_ms": round(percentile(lat, 50), 1) if lat else None,
            "p99_ms": round(percentile(lat, 99), 1) if lat else None,
            # the transport: page -> proxy -> ingress -> replica and back, less the replica's own time
            "outside_p50_ms": round(percentile(outside, 50), 1) if outside else None}
