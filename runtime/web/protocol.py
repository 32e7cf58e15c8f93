"""The binary WebSocket message shared by the server and static/app.js.

    uint32 little-endian n | n bytes of UTF-8 JSON header | payload (an image)

Page -> server:  {"kind": "frame", "seq": int, "t": ms}  + JPEG/WebP camera frame
                 {"kind": "source"}                      + JPEG/PNG/WebP portrait
Server -> page:  {"kind": "frame", "seq", "t", "session", "face", "server_ms", "stages", ...} + JPEG
Text messages are JSON objects with a "type" (docs/web.md lists them).
"""
from __future__ import annotations

import json
import struct

MAX_HEADER = 4096


class ProtocolError(ValueError):
    """A message that does not follow the format; the message names what is wrong."""


def pack(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER:
        raise ProtocolError(f"header of {len(head)} bytes is over {MAX_HEADER}")
    return struct.pack("<I", len(head)) + head + payload


def unpack(msg: bytes) -> tuple[dict, bytes]:
    if len(msg) < 4:
        raise ProtocolError("binary message shorter than its 4-byte header length")
    (n,) = struct.unpack("<I", msg[:4])
    if n > MAX_HEADER or 4 + n > len(msg):
        raise ProtocolError(f"bad header length {n}")
    try:
        header = json.loads(msg[4:4 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    return header, msg[4 + n:]


MAX_TEXT = 4096


def parse_text(data: str) -> dict:
    """A text (control) message: a JSON object of at most MAX_TEXT characters, else ProtocolError."""
    if len(data) > MAX_TEXT:
        raise ProtocolError(f"text message over {MAX_TEXT} characters")
    try:
        m = json.loads(data)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"text message is not JSON: {e}") from None
    if not isinstance(m, dict):
        raise ProtocolError("text message must be a JSON object")
    return m
