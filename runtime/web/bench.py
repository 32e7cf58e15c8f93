"""python -m runtime.web.bench: what the transport costs on this machine (README "Browser client").

Frames are the driving sample (samples/driving.mp4) resized to each side. For every size it
measures, per frame, the median over all frames of:
* cv2 JPEG encode and decode at quality 80 and 90 (what the server does per frame; the page's
  JPEG encode is the browser's, similar work) and the bytes on the wire;
* libvpx VP8 encode and decode through PyAV, realtime deadline, one thread, as a stand-in for a WebRTC
  video track (aiortc's default codec is VP8 through libvpx);
* the loopback round trip of a WebSocket binary message of that JPEG's size (aiohttp echo
  server and client on 127.0.0.1).
Prints a markdown table; --json writes the numbers.

With --server URL (a running `python -m runtime.webcam --serve`, local or through a tunnel) it
instead sends sample frames one at a time over the real protocol and reports the round trip, the
server's own time (receipt -> encoded result) and their difference: what the link, the WebSocket
and the JPEG coding add to the model's time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _median_ms(fn, items) -> float:
    times = []
    for x in items:
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def jpeg_costs(frames: list[np.ndarray], quality: int) -> dict:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    bgr = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in frames]
    blobs = [cv2.imencode(".jpg", f, params)[1] for f in bgr]
    enc = _median_ms(lambda f: cv2.imencode(".jpg", f, params), bgr)
    dec = _median_ms(lambda b: cv2.imdecode(b, cv2.IMREAD_COLOR), blobs)
    return {"encode_ms": enc, "decode_ms": dec, "bytes": int(statistics.median(len(b) for b in blobs))}


def vp8_costs(frames: list[np.ndarray], fps: int = 15) -> dict:
    import av
    h, w = frames[0].shape[:2]
    enc = av.CodecContext.create("libvpx", "w")
    enc.width, enc.height, enc.pix_fmt, enc.time_base = w, h, "yuv420p", Fraction(1, fps)
    enc.bit_rate = 1_000_000
    enc.thread_count = 1  # libvpx's own threads collapse on a busy 2-core machine (200+ ms a frame)
    enc.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    packets, enc_ms = [], []
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(f, format="rgb24")
        vf.pts = i
        t0 = time.perf_counter()
        out = enc.encode(vf.reformat(format="yuv420p"))
        enc_ms.append((time.perf_counter() - t0) * 1e3)
        packets += out
    packets += enc.encode(None)
    dec = av.CodecContext.create("vp8", "r")
    dec_ms = []
    for p in packets:
        t0 = time.perf_counter()
        for fr in dec.decode(p):
            fr.to_ndarray(format="rgb24")
        dec_ms.append((time.perf_counter() - t0) * 1e3)
    return {"encode_ms": statistics.median(enc_ms), "decode_ms": statistics.median(dec_ms),
            "bytes": int(statistics.median(p.size for p in packets))}


def loopback_rtt(sizes: list[int], n: int = 100) -> dict[int, float]:
    """Median ms for a binary WebSocket message of each size to go to an echo server and back.
    Server and client run separate event loops (the server's in a thread), over 127.0.0.1."""
    import threading

    from aiohttp import ClientSession, web

    async def echo(request):
        ws = web.WebSocketResponse(max_msg_size=16 << 20)
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_bytes(msg.data)
        return ws

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        app = web.Application()
        app.router.add_get("/ws", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner, runner.addresses[0][1]

    runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)

    async def client():
        out = {}
        async with ClientSession() as s, s.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
            for size in sizes:
                payload, times = bytes(size), []
                for _ in range(n):
                    t0 = time.perf_counter()
                    await ws.send_bytes(payload)
                    back = await ws.receive()
                    assert len(back.data) == size, "the echo lost bytes"
                    times.append((time.perf_counter() - t0) * 1e3)
                out[size] = statistics.median(times)
        return out

    try:
        return asyncio.run(client())
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def server_rtt(url: str, n: int = 20, side: int = 256, quality: int = 80) -> dict:
    """Frames one at a time to a running server: median round trip, server time, and overhead (ms)."""
    from aiohttp import ClientSession, WSMsgType

    from runtime.video_io import read_video
    from runtime.web.protocol import pack, unpack
    video = read_video(ROOT / "samples" / "driving.mp4").frames
    blobs = [cv2.imencode(".jpg", cv2.cvtColor(cv2.resize(f, (side, side)), cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes() for f in video]
    ws_url = url.rstrip("/") + "/ws" + (url[url.index("?"):] if "?" in url else "")

    async def main():
        rtt, server = [], []
        async with ClientSession() as s, s.ws_connect(ws_url) as ws:
            hello = await ws.receive_json()
            if hello.get("type") != "hello":
                raise RuntimeError(f"the server answered {hello}")
            for k in range(n + 2):  # the first two warm the session up
                t0 = time.perf_counter()
                await ws.send_bytes(pack({"kind": "frame", "seq": k + 1, "t": t0 * 1e3}, blobs[k % len(blobs)]))
                while True:
                    msg = await ws.receive(timeout=120)
                    if msg.type == WSMsgType.BINARY:
                        head, _ = unpack(msg.data)
                        break
                    if msg.type != WSMsgType.TEXT:
                        raise RuntimeError(f"the socket closed: {msg}")
                if k >= 2:
                    rtt.append((time.perf_counter() - t0) * 1e3)
                    server.append(head["server_ms"])
        return rtt, server

    rtt, server = asyncio.run(main())
    over = [a - b for a, b in zip(rtt, server, strict=True)]
    return {"frames": n, "side": side, "round_trip_ms": statistics.median(rtt),
            "server_ms": statistics.median(server), "overhead_ms": statistics.median(over)}


def run(sides=(128, 256, 512), frames_n: int = 45) -> list[dict]:
    from runtime.video_io import read_video
    video = read_video(ROOT / "samples" / "driving.mp4").frames[:frames_n]
    rows = []
    for side in sides:
        frames = [cv2.resize(f, (side, side), interpolation=cv2.INTER_LINEAR) for f in video]
        for q in (80, 90):
            rows.append({"side": side, "codec": f"JPEG q{q}", **jpeg_costs(frames, q)})
        rows.append({"side": side, "codec": "VP8 (libvpx realtime)", **vp8_costs(frames)})
    rtt = loopback_rtt(sorted({r["bytes"] for r in rows if r["codec"].startswith("JPEG")}))
    for r in rows:
        r["ws_rtt_ms"] = rtt.get(r["bytes"])
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| side | codec | encode ms | decode ms | bytes/frame | WebSocket loopback round trip ms |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        rtt = f"{r['ws_rtt_ms']:.2f}" if r["ws_rtt_ms"] is not None else "–"
        lines.append(f"| {r['side']} | {r['codec']} | {r['encode_ms']:.2f} | {r['decode_ms']:.2f} | "
                     f"{r['bytes']:,} | {rtt} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.web.bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    p.add_argument("--server", metavar="URL", help="measure a running server instead (e.g. http://127.0.0.1:8000/)")
    p.add_argument("--frames", type=int, default=20, help="frames sent to --server")
    a = p.parse_args(argv)
    if a.server:
        rows = [server_rtt(a.server, a.frames)]
        print(" ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[0].items()))
    else:
        rows = run()
        print(table(rows))
    if a.json:
        tmp = a.json.with_suffix(a.json.suffix + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
