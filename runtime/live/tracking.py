"""Live face tracking: camera frame -> pose hint and local-patch hint at R x R, steady and cheap.

The live equivalent of runtime/preprocess.py (spec §4.1-4.2, §7.2), one frame at a time:

* The re-framing affine maps the driving face box onto the source face box (`reframe_affine`),
  straight from camera pixels to R x R in one cv2.warpAffine (the offline path resizes to R first;
  the anisotropic box-to-box scale makes the two the same map). reframe="fixed" takes it from the
  first good face, like the offline pipeline's best frame, and recalibrate() takes it again;
  reframe="follow" recomputes it from the smoothed box every frame (the crop follows the head).
* The landmarker runs every `detect_every` frames, on a square region of interest `roi_scale`
  times the last face box (falling back to the full frame when the face is not in it).
* Points and box are smoothed with a One Euro filter, so crop and patches do not jitter.
* A frame with no face keeps the last good landmarks (and affine) and says face=False. Until the
  first face, there is nothing to hold and the tracker returns None.

`Hints.pose` is the pose hint before the x/127.5-1 map; `Hints.local` has the eyes/mouth patches
of `pose` on black, which that map sends to the -1 background of the spec's local hint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from runtime.landmarks import Landmarker, Landmarks, default_landmarker
from runtime.preprocess import patch_centres, reframe_affine

REFRAME_MODES = ("fixed", "follow")


class OneEuroFilter:
    """The 1€ filter (Casiez, Roussel, Vogel, CHI 2012), elementwise on an array.

    An exponential low-pass whose cutoff rises with speed: slow motion is smoothed hard (no
    jitter), fast motion passes with little lag. Per sample at time t, with dt = t - t_prev:
        alpha(fc) = 1 / (1 + tau / dt),  tau = 1 / (2 pi fc)
        dx  = (x - x_hat_prev) / dt,          dx_hat = dx_hat_prev + alpha(d_cutoff) (dx - dx_hat_prev)
        fc  = min_cutoff + beta |dx_hat|,     x_hat  = x_hat_prev  + alpha(fc) (x - x_hat_prev)
    min_cutoff is in Hz; beta in 1/(unit of x), here pixels.
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.02, d_cutoff: float = 1.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.reset()

    def reset(self) -> None:
        self._x = self._dx = self._t = None

    @staticmethod
    def _alpha(cutoff, dt: float):
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self._x is None or self._x.shape != x.shape:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = t - self._t
        if dt <= 0:  # same or earlier timestamp: nothing to integrate
            return self._x.copy()
        dx = (x - self._x) / dt
        self._dx = self._dx + self._alpha(self.d_cutoff, dt) * (dx - self._dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        self._x = self._x + self._alpha(cutoff, dt) * (x - self._x)
        self._t = t
        return self._x.copy()


@dataclass
class Hints:
    pose: np.ndarray          # (R, R, 3) uint8 RGB: the driving frame on the source framing
    local: np.ndarray         # (R, R, 3) uint8: eyes/mouth patches of `pose` on black (-1 after x/127.5-1)
    face: bool                # a face was found in this frame (False: last good landmarks held)
    box: np.ndarray | None    # (4,) smoothed face box x0, y0, x1, y1 in camera pixels
    affine: np.ndarray        # (2, 3) camera pixels -> R x R pixels
    centres: np.ndarray       # (3, 2) int patch centres (left eye, right eye, mouth) at R


def local_patches(pose: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(R, R, 3) uint8 canvas of zeros with (R/4)^2 patches of `pose` at `centres` (spec §4.2).

    The uint8 twin of runtime.preprocess.local_patch_hint: same order (left eye, right eye,
    mouth; later writes win) and same half-size R/8; black here is -1 after x/127.5-1.
    """
    hs = pose.shape[0] // 8
    out = np.zeros_like(pose)
    for x, y in centres.tolist():
        out[y - hs:y + hs, x - hs:x + hs] = pose[y - hs:y + hs, x - hs:x + hs]
    return out


def stretch_affine(width: int, height: int, size: int) -> np.ndarray:
    """(2, 3) map of a width x height frame onto size x size, stretched (the offline resize)."""
    return np.array([[size / width, 0, 0.5 * size / width - 0.5],
                     [0, size / height, 0.5 * size / height - 0.5]], np.float32)


class FaceTracker:
    """Per-frame driving preprocessing for a live stream. Call it with each camera frame."""

    def __init__(self, resolution: int, source_landmarks: Landmarks | None, landmarker: Landmarker | None = None,
                 detect_every: int = 1, reframe: str = "fixed", roi_scale: float = 2.0,
                 min_cutoff: float = 1.0, beta: float = 0.02, reset_after: float = 0.5):
        if reframe not in REFRAME_MODES:
            raise ValueError(f"reframe={reframe!r}: choose one of {', '.join(REFRAME_MODES)}")
        if detect_every < 1:
            raise ValueError(f"detect_every={detect_every}: must be >= 1 (1 = detect on every frame)")
        self.resolution, self.reframe, self.detect_every = resolution, reframe, detect_every
        self.landmarker = landmarker or default_landmarker()
        self.roi_scale, self.reset_after = roi_scale, reset_after
        self.filter = OneEuroFilter(min_cutoff, beta)
        self.source_landmarks = source_landmarks
        self._lm: Landmarks | None = None     # smoothed landmarks, camera pixels
        self._affine: np.ndarray | None = None
        self._calibrated = False              # the affine came from a frame with a face
        self._found = False                   # the last detection found a face
        self._t_seen = -math.inf              # time of the last detection with a face
        self._count = 0
        self.last_detect_roi = False          # whether the last detection used the region of interest

    def set_source(self, source_landmarks: Landmarks | None) -> None:
        """A new source portrait (its landmarks at R x R, or None for no re-framing)."""
        self.source_landmarks = source_landmarks
        self._calibrated = False

    def recalibrate(self) -> None:
        """Take the re-framing affine again from the next good face (reframe="fixed")."""
        self._calibrated = False

    def __call__(self, rgb: np.ndarray, t: float) -> Hints | None:
        """rgb: (H, W, 3) uint8 camera frame; t: its capture time in seconds (perf_counter)."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"FaceTracker expects an (H, W, 3) uint8 RGB frame, got {rgb.dtype} {rgb.shape}")
        if self._count % self.detect_every == 0 or self._lm is None:
            self._update(rgb, t)
        self._count += 1
        if self._lm is None:
            return None
        if not self._calibrated or (self.reframe == "follow" and self._found):
            # until a frame with a face fixes it, the affine follows the held landmarks
            self._affine = self._make_affine(rgb.shape[1], rgb.shape[0])
            self._calibrated = self._found
        r = self.resolution
        pose = cv2.warpAffine(rgb, self._affine, (r, r), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        centres = patch_centres(self._lm.transformed(self._affine).centres(), r)
        return Hints(pose, local_patches(pose, centres), self._found, self._lm.box.copy(), self._affine, centres)

    def _make_affine(self, width: int, height: int) -> np.ndarray:
        if self.source_landmarks is None:
            return stretch_affine(width, height, self.resolution)
        return reframe_affine(self.source_landmarks, self._lm)

    def _update(self, rgb: np.ndarray, t: float) -> None:
        raw = self._detect(rgb)
        self._found = raw is not None
        if raw is None:
            return
        if t - self._t_seen > self.reset_after:  # re-acquired after a gap: do not glide from the old place
            self.filter.reset()
        self._t_seen = t
        k = len(raw.points)
        v = self.filter(np.concatenate([raw.points.ravel(), raw.centres().ravel(), raw.box]), t)
        pts, c, box = v[:2 * k].reshape(k, 2), v[2 * k:2 * k + 6].reshape(3, 2), v[2 * k + 6:]
        self._lm = Landmarks(pts.astype(np.float32), left_eye=c[0].astype(np.float32),
                             right_eye=c[1].astype(np.float32), mouth=c[2].astype(np.float32),
                             box=box.astype(np.float32), score=raw.score)

    def _detect(self, rgb: np.ndarray) -> Landmarks | None:
        """Detect in the square region of interest around the last box, else in the whole frame."""
        self.last_detect_roi = False
        if self._lm is not None and self.roi_scale > 0:
            h, w = rgb.shape[:2]
            (cx, cy), (ex, ey) = self._lm.extent()
            half = self.roi_scale * max(ex, ey)
            x0, y0 = int(max(0, cx - half)), int(max(0, cy - half))
            x1, y1 = int(min(w, cx + half)), int(min(h, cy + half))
            if x1 - x0 >= 16 and y1 - y0 >= 16 and (x1 - x0) * (y1 - y0) < 0.8 * w * h:
                lm = self.landmarker.detect(rgb[y0:y1, x0:x1])
                if lm is not None:
                    self.last_detect_roi = True
                    return lm.transformed(np.array([[1, 0, x0], [0, 1, y0]], np.float32))
        return self.landmarker.detect(rgb)
