"""Source and driving preprocessing: square source crop, driving re-framing, local-patch hint.

Follows spec §4.1, §4.2, §6.4 (`best_frame`) and §7.1-7.2, with these deliberate differences
(docs/preprocessing.md has the details):
* The source is cropped to a square around the face (`crop_source=True`); the reference does no
  crop and stretches non-square images.
* Landmarks are detected once per driving frame, on the resized but *unaligned* frame, and the
  re-framing affine is applied to them, instead of running the detector a second time on the
  aligned frame. The warp is exact, so this only removes detector noise and half the cost.
* A frame without a face reuses the last good patch centres (frames before the first face use
  the first good ones); the reference crashes there. A clip with no face at all raises
  `NoFaceError`.
* All geometry happens at the output resolution R (the reference detects at 256 and scales by 2).

Outputs are float32 torch tensors in [-1, 1], NCHW, on the CPU.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from runtime.landmarks import Landmarker, Landmarks, default_landmarker

AUTO_BEST_FRAME = -1  # pick the frame whose landmarks are closest (L1) to the source's
NO_REFRAME = -2       # do not re-frame the driving video


class NoFaceError(ValueError):
    """No face where one is needed; the message says which input and what to do."""


@dataclass
class Preprocessed:
    source: torch.Tensor   # (1, 3, R, R) source portrait
    driving: torch.Tensor  # (N, 3, R, R) re-framed driving frames: the pose hint (§4.1)
    local: torch.Tensor    # (N, 3, R, R) local-patch hint, background -1 (§4.2)
    best_frame: int        # frame whose landmark box fixed the re-framing; -2 if none
    affine: np.ndarray     # (2, 3) re-framing transform in R-pixel space
    centres: np.ndarray    # (N, 3, 2) int patch centres (left eye, right eye, mouth) as used
    found: np.ndarray      # (N,) bool, a face was detected in that frame


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W, 3) uint8 to (size, size, 3), stretching like the reference (§7.1).

    Area averaging when shrinking (anti-aliased, like skimage's resize), bilinear when growing.
    """
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1] (the `x*2-1` map)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x[None]
    return (x.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()


def crop_square(image: np.ndarray, lm: Landmarks, scale: float = 2.2) -> np.ndarray:
    """Square crop of side `scale * max(face box w, h)` centred on the face box.

    The square is shifted to stay inside the image and shrunk to fit if it is too big, so no
    padding is ever invented.
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = lm.box
    side = round(min(scale * max(x1 - x0, y1 - y0), h, w))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(np.clip(round(cx - side / 2), 0, w - side))
    top = int(np.clip(round(cy - side / 2), 0, h - side))
    return image[top:top + side, left:left + side]


def prepare_source(image: np.ndarray, resolution: int, landmarker: Landmarker,
                   crop: bool = True) -> tuple[np.ndarray, Landmarks | None]:
    """Source image -> ((R, R, 3) uint8, its landmarks at R or None if no face is visible)."""
    if crop:
        lm = landmarker.detect(image)
        if lm is None:
            raise NoFaceError(
                "no face found in the source image, so it cannot be cropped around the face: "
                "use a portrait with a visible, roughly frontal face, or pass crop_source=False "
                "with a square portrait that is already framed")
        image = crop_square(image, lm)
    image = resize(image, resolution)
    return image, landmarker.detect(image)


def reframe_affine(src: Landmarks, drv: Landmarks) -> np.ndarray:
    """(2, 3) affine mapping the driving landmark box onto the source box (§7.2 step 4).

    Anisotropic scale plus translation, no rotation: x' = c_s + (x - c_d) * e_s / e_d per axis.
    """
    cs, es = src.extent()
    cd, ed = drv.extent()
    k = es / np.maximum(ed, 1e-3)  # (2,)
    return np.array([[k[0], 0.0, cs[0] - k[0] * cd[0]],
                     [0.0, k[1], cs[1] - k[1] * cd[1]]], np.float32)


def best_frame_index(src: Landmarks, frames: Sequence[Landmarks | None]) -> int:
    """Index of the frame whose landmarks have the least L1 distance to the source's (§6.4)."""
    dist = [src.distance(lm) if lm is not None else np.inf for lm in frames]
    if not frames or not np.isfinite(min(dist)):
        raise NoFaceError("no driving frame has a face to compare with the source")
    return int(np.argmin(dist))


def warp(frame: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Apply the re-framing affine: bilinear, constant black border, same size (§7.2 step 5)."""
    h, w = frame.shape[:2]
    return cv2.warpAffine(frame, affine, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def patch_centres(centres: np.ndarray, size: int) -> np.ndarray:
    """(3, 2) float centres -> int centres rounded and clipped to [size/8, size - size/8]."""
    hs = size // 8
    return np.clip(np.rint(centres), hs, size - hs).astype(np.int64)


def local_patch_hint(frame: torch.Tensor, centres: np.ndarray) -> torch.Tensor:
    """Local-patch hint (§4.2): -1 canvas with (size/4)^2 patches of `frame` at `centres`.

    frame: (3, R, R) in [-1, 1]; centres: (3, 2) int (x, y) from `patch_centres`, written in
    order left eye, right eye, mouth, so later patches overwrite earlier ones where they overlap.
    """
    hs = frame.shape[-1] // 8
    out = torch.full_like(frame, -1.0)
    for x, y in centres.tolist():
        out[:, y - hs:y + hs, x - hs:x + hs] = frame[:, y - hs:y + hs, x - hs:x + hs]
    return out


class DrivingPreprocessor:
    """Per-frame driving preprocessing with a fixed re-framing transform; usable for streams.

    Call it with each driving frame at R x R (see `resize`) and, if already known, its landmarks
    in that frame. It keeps the last good patch centres for frames without a face.
    """

    def __init__(self, resolution: int, affine: np.ndarray | None = None,
                 landmarker: Landmarker | None = None, centres: np.ndarray | None = None):
        self.resolution = resolution
        self.affine = np.eye(2, 3, dtype=np.float32) if affine is None else affine
        self.landmarker = landmarker
        self.centres = centres  # (3, 2) int, last good; None until a face was seen

    def __call__(self, frame: np.ndarray, lm: Landmarks | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(R, R, 3) uint8 -> pose hint (3, R, R), local hint (3, R, R), face found."""
        if frame.shape[:2] != (self.resolution, self.resolution):
            raise ValueError(f"expected a {self.resolution}x{self.resolution} frame, "
                             f"got {frame.shape[1]}x{frame.shape[0]}: call resize() first")
        if lm is None and self.landmarker is not None:
            lm = self.landmarker.detect(frame)
        if lm is not None:
            self.centres = patch_centres(lm.transformed(self.affine).centres(), self.resolution)
        if self.centres is None:
            raise NoFaceError("no face seen yet in the driving stream, so there are no eye and "
                              "mouth centres for the local-patch hint: start with the face in view")
        pose = to_tensor(warp(frame, self.affine))[0]
        return pose, local_patch_hint(pose, self.centres), lm is not None


def preprocess(source: np.ndarray, driving: Sequence[np.ndarray] | np.ndarray,
               resolution: int = 512, best_frame: int = AUTO_BEST_FRAME,
               landmarker: Landmarker | None = None, crop_source: bool = True) -> Preprocessed:
    """Preprocess a source portrait and a driving clip, all (H, W, 3) uint8 RGB (spec §7).

    best_frame: >= 0 uses that driving frame for the re-framing transform, -1 picks it
    automatically (least L1 landmark distance to the source), -2 disables re-framing.
    """
    landmarker = landmarker or default_landmarker()
    src, src_lm = prepare_source(source, resolution, landmarker, crop_source)
    frames = [resize(f, resolution) for f in driving]
    lms = [landmarker.detect(f) for f in frames]
    found = np.array([lm is not None for lm in lms], bool)
    if not found.any():
        raise NoFaceError(
            f"no face found in any of the {len(frames)} driving frames, so the eye and mouth "
            "patches cannot be placed: use a driving clip where the face is visible and roughly "
            "frontal (at least ~50 px wide after resizing to 256x256)")
    best, affine = _choose_reframing(src_lm, lms, best_frame)
    first = lms[int(np.argmax(found))]
    step = DrivingPreprocessor(resolution, affine,
                               centres=patch_centres(first.transformed(affine).centres(), resolution))
    pose, local, centres = [], [], []
    for frame, lm in zip(frames, lms):
        p, q, _ = step(frame, lm)
        pose.append(p)
        local.append(q)
        centres.append(step.centres)
    return Preprocessed(source=to_tensor(src), driving=torch.stack(pose), local=torch.stack(local),
                        best_frame=best, affine=affine, centres=np.stack(centres), found=found)


def _choose_reframing(src_lm: Landmarks | None, lms: Sequence[Landmarks | None],
                      best_frame: int) -> tuple[int, np.ndarray]:
    if best_frame == NO_REFRAME:
        return NO_REFRAME, np.eye(2, 3, dtype=np.float32)
    if src_lm is None:
        raise NoFaceError("no face found in the (resized) source image, so the driving video "
                          "cannot be re-framed to it: use a clearer portrait or pass best_frame=-2")
    if best_frame == AUTO_BEST_FRAME:
        best_frame = best_frame_index(src_lm, lms)
    elif not 0 <= best_frame < len(lms):
        raise ValueError(f"best_frame={best_frame} is out of range for {len(lms)} driving frames "
                         "(use 0..N-1, -1 for automatic or -2 for no re-framing)")
    elif lms[best_frame] is None:
        raise NoFaceError(f"no face found in driving frame best_frame={best_frame}: pick another "
                          "frame, -1 for automatic or -2 for no re-framing")
    return best_frame, reframe_affine(src_lm, lms[best_frame])
