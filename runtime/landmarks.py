"""Face landmarks behind one small interface, so the landmarker can be swapped.

X-Portrait uses 68-point FAN landmarks for three things (spec §4.2, §6.4, §7.2): the eye and mouth
centres of the local-patch hint, a landmark bounding box for the driving re-framing transform, and
the L1 landmark distance that picks `best_frame`. All three only need a consistent point set per
face, so any landmarker that returns the same K points for source and driving frames will do.

`YuFaceLandmarker` wraps libfacedetection (the `yuface` wheel, BSD-3-Clause, ~1 MB, no Python
dependencies, CNN weights compiled into the shared library, so nothing is downloaded at run time).
It returns a face box and 5 points: right eye, left eye, nose tip, right and left mouth corner
(subject's left/right, as in the iBUG 68-point convention: the subject's left eye is on the image
right). docs/preprocessing.md says why it was chosen and how it was measured.
"""

import ctypes
import glob
import os
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np


@dataclass(frozen=True)
class Landmarks:
    """One face. All coordinates are (x, y) pixels of the image given to `detect`."""

    points: np.ndarray     # (K, 2) float32; K is fixed per landmarker
    left_eye: np.ndarray   # (2,) subject's left eye (image right); spec §4.2 "left eye"
    right_eye: np.ndarray  # (2,) subject's right eye (image left)
    mouth: np.ndarray      # (2,) mouth centre
    box: np.ndarray        # (4,) face box x0, y0, x1, y1
    score: float = 1.0

    def centres(self) -> np.ndarray:
        """Patch centres in the spec's write order: left eye, right eye, mouth. (3, 2)"""
        return np.stack([self.left_eye, self.right_eye, self.mouth]).astype(np.float32)

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        """Centre and half-extent per axis of the face (spec §7.2 step 3). Two (2,) arrays.

        The reference takes the box of its 68 points, which spans brows to chin and jaw to jaw.
        The face box is the closer match for a sparse landmarker (5 points span only eyes to
        mouth, so a 1 px error there is a 5 % scale error at 256 px), hence the box is used.
        """
        lo, hi = self.box[:2], self.box[2:]
        return ((lo + hi) / 2).astype(np.float32), ((hi - lo) / 2).astype(np.float32)

    def distance(self, other: "Landmarks") -> float:
        """L1 distance of points and box corners, for picking `best_frame` (spec §6.4)."""
        return float(np.abs(self.points - other.points).sum() + np.abs(self.box - other.box).sum())

    def transformed(self, m: np.ndarray) -> "Landmarks":
        """The same face after the 2x3 affine `m` was applied to the image.

        The box stays exact for the axis-aligned maps used here (scale, flip, translation).
        """
        def f(p):
            p = np.asarray(p, np.float32)
            return (p @ m[:, :2].T + m[:, 2]).astype(np.float32)
        corners = f(self.box.reshape(2, 2))
        box = np.concatenate([corners.min(0), corners.max(0)])
        return Landmarks(f(self.points), f(self.left_eye), f(self.right_eye), f(self.mouth),
                         box.astype(np.float32), self.score)


class Landmarker(Protocol):
    def detect(self, image: np.ndarray) -> Landmarks | None:
        """image: (H, W, 3) uint8 RGB. Returns the most confident face, or None."""


class YuFaceLandmarker:
    """libfacedetection (YuNet) via the `yuface` wheel: face box + 5 points.

    Detection runs on a copy whose longer side is at most `max_side` px: the network is fast at
    256 px and slows down sharply above (see docs/preprocessing.md). If nothing is found and the
    image is larger, one more try runs at `2 * max_side`, which rescues small faces in big photos.
    `threads` sets the OpenMP threads of yuface's own bundled libgomp (not torch's); 1 is the
    fastest choice on a busy machine because OpenMP spin-waiting collapses under contention.
    """

    def __init__(self, max_side: int = 256, min_score: float = 0.5, threads: int = 1):
        try:
            import yuface
        except ImportError as e:
            raise ImportError("the face landmarker needs the `yuface` wheel: "
                              "pip install yuface==2023.5.1 (CPython <= 3.11, Linux/Windows x86-64); "
                              "on other platforms pass your own Landmarker") from e
        self._detect = yuface.detect
        self.max_side, self.min_score, self.threads = max_side, min_score, threads
        libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(yuface.__file__)),
                                      "yuface.libs", "libgomp*"))
        self._gomp = ctypes.CDLL(libs[0]) if libs else None

    def detect(self, image: np.ndarray) -> Landmarks | None:
        image = _as_rgb_uint8(image)
        h, w = image.shape[:2]
        lm = self._detect_at(image, self.max_side)
        if lm is None and max(h, w) > self.max_side:
            lm = self._detect_at(image, 2 * self.max_side)
        return lm

    def _detect_at(self, image: np.ndarray, max_side: int) -> Landmarks | None:
        h, w = image.shape[:2]
        s = min(1.0, max_side / max(h, w))
        small = image if s == 1.0 else cv2.resize(
            image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        bgr = np.ascontiguousarray(small[:, :, ::-1])
        if self._gomp is not None:  # per call: the OpenMP setting is per calling thread
            self._gomp.omp_set_num_threads(self.threads)
        confs, boxes, points = self._detect(bgr, self.min_score)
        if len(confs) == 0:
            return None
        i = int(np.argmax(confs))
        sx, sy = w / small.shape[1], h / small.shape[0]
        scale = np.array([sx, sy], np.float32)
        p = (points[i].reshape(5, 2).astype(np.float32) + 0.5) * scale - 0.5  # (5, 2)
        x, y, bw, bh = boxes[i].astype(np.float32)
        box = np.array([x * sx, y * sy, (x + bw) * sx, (y + bh) * sy], np.float32)
        return Landmarks(points=p, left_eye=p[1], right_eye=p[0], mouth=(p[3] + p[4]) / 2,
                         box=box, score=float(confs[i]) / 100.0)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    return image


def default_landmarker() -> Landmarker:
    """The landmarker the runtime uses unless one is passed in."""
    return YuFaceLandmarker()
