"""Heads-up display: a few lines of text on a dark box in the top-left corner of a frame.

    rgb = draw_hud(rgb, hud_lines(fps=58.9, latency_ms=41.2, stages={"track": 3.1}, dropped=4, face=True))

Drawn with cv2.putText (Hershey simplex, anti-aliased) so it needs no font files. The text scale
follows the frame height, so the HUD stays readable on a scaled window.
"""
from __future__ import annotations

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
BOX_ALPHA = 0.75  # how dark the box behind the text is (0 = clear, 1 = black)


def hud_layout(height: int, lines: list[str]) -> tuple[float, int, int, int, tuple[int, int, int, int]]:
    """(font scale, thickness, text height, line height, box (x0, y0, x1, y1)) for a frame `height` px high."""
    scale = max(0.4, height / 720)
    thick = 1 if scale < 0.9 else 2
    (_, th), base = cv2.getTextSize("Ag", FONT, scale, thick)
    line_h = th + base + max(4, round(6 * scale))
    pad = max(4, round(6 * scale))
    width = max((cv2.getTextSize(s, FONT, scale, thick)[0][0] for s in lines), default=0)
    box = (pad, pad, pad + width + 2 * pad, pad + line_h * len(lines) + pad)
    return scale, thick, th, line_h, box


def draw_hud(rgb: np.ndarray, lines: list[str] | None) -> np.ndarray:
    """A copy of (H, W, 3) uint8 `rgb` with `lines` in white on a dark box; unchanged if no lines."""
    if not lines:
        return rgb
    out = np.array(rgb, copy=True)
    h, w = out.shape[:2]
    scale, thick, th, line_h, (x0, y0, x1, y1) = hud_layout(h, lines)
    x1, y1 = min(x1, w), min(y1, h)
    roi = out[y0:y1, x0:x1]
    roi[:] = (roi.astype(np.float32) * (1 - BOX_ALPHA)).astype(np.uint8)
    pad = x0
    for i, text in enumerate(lines):
        baseline = y0 + pad // 2 + i * line_h + th + (line_h - th) // 2
        cv2.putText(out, text, (x0 + pad, baseline), FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out


def hud_lines(fps: float, latency_ms: float, stages: dict[str, float], dropped: int, face: bool,
              extra: list[str] | None = None) -> list[str]:
    """The standard HUD text: output fps, capture->present latency, per-stage ms, drops, face state."""
    lines = [f"{fps:5.1f} fps   latency {latency_ms:6.1f} ms   dropped {dropped}"]
    if stages:
        lines.append("  ".join(f"{k} {v:.1f}" for k, v in stages.items()) + " ms")
    lines.append("face: tracking" if face else "NO FACE - holding last crop")
    return lines + list(extra or [])
