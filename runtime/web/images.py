"""Images from the network: size read from the header first, then a bounded decode.

A hostile upload can claim 100000 x 100000 pixels in a few hundred bytes; decoding it would
allocate 30 GB. So the width and height are read from the file header (JPEG SOF, PNG IHDR, WebP
VP8/VP8L/VP8X) and checked against the limits before any decoder runs. A file that is not one of
these formats, whose header is cut short, or that the decoder rejects raises ImageError with a
message meant for the person who sent it.
"""
from __future__ import annotations

import struct

import cv2
import numpy as np

FORMATS = ("jpeg", "png", "webp")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """The bytes are not an acceptable image; the message says why and what to send instead."""


def image_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone. Raises ImageError."""
    if data[:3] == b"\xff\xd8\xff":
        return ("jpeg", *_jpeg_size(data))
    if data[:8] == _PNG_SIGNATURE:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageError("broken PNG: no IHDR header")
        w, h = struct.unpack(">II", data[16:24])
        return "png", w, h
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("webp", *_webp_size(data))
    raise ImageError("not a JPEG, PNG or WebP image")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ImageError("broken JPEG: bad marker")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if length < 2:
            raise ImageError("broken JPEG: bad segment length")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            if h == 0 or w == 0:
                raise ImageError("unsupported JPEG: zero width or height in the frame header")
            return w, h
        i += 2 + length
    raise ImageError("broken JPEG: no frame header")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk, p = data[12:16], data[20:30]
    if len(p) < 10:
        raise ImageError("broken WebP: header cut short")
    if chunk == b"VP8 ":
        if p[3:6] != b"\x9d\x01\x2a":
            raise ImageError("broken WebP: bad VP8 start code")
        w, h = struct.unpack("<HH", p[6:10])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        if p[0] != 0x2F:
            raise ImageError("broken WebP: bad VP8L signature")
        bits = int.from_bytes(p[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(p[4:7], "little") + 1, int.from_bytes(p[7:10], "little") + 1
    raise ImageError("unsupported WebP chunk")


def check_image(data: bytes, max_bytes: int, max_pixels: int, max_side: int | None = None,
                formats: tuple[str, ...] = FORMATS, what: str = "image") -> tuple[str, int, int]:
    """Check size, format and header dimensions without decoding; returns (format, width, height)."""
    if not data:
        raise ImageError(f"empty {what}")
    if len(data) > max_bytes:
        raise ImageError(f"{what} of {len(data)} bytes is over the limit of {max_bytes}: send a smaller file")
    fmt, w, h = image_header(data)
    if fmt not in formats:
        raise ImageError(f"{what}: {fmt} is not accepted here; send {' or '.join(formats)}")
    if w * h > max_pixels or (max_side is not None and max(w, h) > max_side):
        side = f", {max_side} px a side" if max_side is not None else ""
        raise ImageError(f"{what} of {w}x{h} pixels is over the limit ({max_pixels} pixels{side}): "
                         "scale it down first")
    return fmt, w, h


def decode_image(data: bytes, max_bytes: int, max_pixels: int, max_side: int | None = None,
                 formats: tuple[str, ...] = FORMATS, what: str = "image") -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB, after check_image. Raises ImageError."""
    _, w, h = check_image(data, max_bytes, max_pixels, max_side, formats, what)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(f"{what} could not be decoded (truncated or corrupt file)")
    if bgr.shape[:2] != (h, w):  # the header we checked is not the one the decoder used
        raise ImageError(f"{what}: header says {w}x{h} but the image is {bgr.shape[1]}x{bgr.shape[0]}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ImageError("JPEG encoding failed")
    return buf.tobytes()
