"""Browser client of the live runtime: `python -m runtime.webcam --serve` (docs/web.md).

sessions.py  SessionManager: one LiveModel, several sessions, fair device scheduling (no HTTP)
server.py    aiohttp server: the page, the WebSocket, the limits; serve(args, cfg)
config.py    WebConfig (limits, bind address, token) and its command-line flags
images.py    image header checks, bounded decoding, JPEG encoding
protocol.py  the binary message format shared with static/app.js
"""
