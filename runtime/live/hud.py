"""Heads-up display: a few lines of text on a dark box in the top-left corner of a frame.

    rgb = draw_hud(rgb, hud_lines(fps=58.9, latency_ms=41.2, stages={"track": 3.1}, dropped=4, face=True))

Drawn with cv2.putText (anti-aliased) so it needs no font files. The text scale follows the frame
height, so the HUD stays readable on a scaled window; lines wider than the frame are wrapped at
spaces.
"""
from __future__ import annotations

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
BOX_ALPHA = 0.75  # how dark the box behind the text is (0 = clear, 1 = black)


def hud_layout(height: int, width: int, lines: list[str]) -> tuple[float, int, int, int, tuple, list[str]]:
    """(font scale, thickness, text height, line height, box (x0, y0, x1, y1), wrapped lines)."""
    scale = max(0.4, height / 720)
    thick = 1 if scale < 0.9 else 2
    (_, th), base = cv2.getTextSize("Ag", FONT, scale, thick)
    line_h = th + base + max(4, round(6 * scale))
    pad = max(4, round(6 * scale))
    text_w = lambda s: cv2.getTextSize(s, FONT, scale, thick)[0][0]  # noqa: E731
    lines = [w for line in lines for w in _wrap(line, width - 4 * pad, text_w)]
    box_w = max((text_w(s) for s in lines), default=0)
    box = (pad, pad, min(width, pad + box_w + 2 * pad), min(height, pad + line_h * len(lines) + pad))
    return scale, thick, th, line_h, box, lines


def _wrap(line: str, max_w: int, text_w) -> list[str]:
    out, cur = [], ""
    for word in line.split(" "):
        cand = f"{cur} {word}" if cur else word
        if cur.strip() and text_w(cand) > max_w:
            out.append(cur.rstrip())
            cur = word
        else:
            cur = cand
    return out + [cur.rstrip()]


def draw_hud(rgb: np.ndarray, lines: list[str] | None) -> np.ndarray:
    """A copy of (H, W, 3) uint8 `rgb` with `lines` in white on a dark box; `rgb` itself if no lines."""
    if not lines:
        return rgb
    out = np.array(rgb, copy=True)
    h, w = out.shape[:2]
    scale, thick, th, line_h, (x0, y0, x1, y1), lines = hud_layout(h, w, lines)
    roi = out[y0:y1, x0:x1]
    roi[:] = (roi.astype(np.float32) * (1 - BOX_ALPHA)).astype(np.uint8)
    for i, text in enumerate(lines):
        baseline = y0 + x0 // 2 + i * line_h + th + (line_h - th) // 2
        cv2.putText(out, text, (2 * x0, baseline), FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out


def hud_lines(fps: float, latency_ms: float, stages: dict[str, float], dropped: int, face: bool,
              extra: list[str] | None = None) -> list[str]:
    """The standard HUD text: output fps, capture->present latency, per-stage ms, drops, face state."""
    lines = [f"{fps:.1f} fps   latency {latency_ms:.1f} ms   dropped {dropped}"]
    if stages:
        lines.append("  ".join(f"{k} {v:.1f}" for k, v in stages.items()) + " ms")
    lines.append("face: tracking" if face else "NO FACE - holding last crop")
    return lines + list(extra or [])
