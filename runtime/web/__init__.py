"""Browser client of the live runtime: `python -m runtime.webcam --serve` (docs/web.md).

sessions.py  SessionManager: one LiveModel, several sessions, fair device scheduling (no HTTP)
state.py     the per-session record, FrameOut / Skip, the manager's errors
server.py    aiohttp server: the page, the WebSocket, the limits; serve(args, cfg)
config.py    WebConfig (limits, bind address, token) and its command-line flags
images.py    image header checks, bounded decoding, JPEG encoding
protocol.py  the binary message format shared with static/app.js
bench.py     python -m runtime.web.bench: what the transport costs
"""
