"""Make the shipped sample inputs: samples/source.png and samples/driving.mp4 (deterministic).

Both come from scikit-image's `astronaut.png` (Eileen Collins, NASA; public domain, see
samples/README.md). Only the PNG file is read, so `pip install --no-deps scikit-image==0.26.0`
is enough. Run from the repository root:

    python -m scripts.make_samples            # or: --astronaut path/to/astronaut.png

The driving clip is a 3 s, 15 fps, 256x256 synthetic performance made by warping the still photo:
* head motion: a similarity transform (rotation, translation, scale) about the face centre,
  varied smoothly over time;
* blinks: the eye regions are squashed vertically toward the eye line (lids close);
* mouth: the lips are pulled apart along the mouth line and the gap is filled with a dark
  mouth-interior colour (jaw drop).
The face positions come from the project's own landmarker, so the script needs `runtime`.
"""

import argparse
import importlib.util
from pathlib import Path

import cv2
import numpy as np

from runtime.landmarks import YuFaceLandmarker
from runtime.preprocess import crop_square, resize
from runtime.video_io import read_image, write_image, write_video

FPS, SECONDS, SIZE = 15, 3.0, 256
MOUTH_COLOUR = np.array([70, 28, 32], np.float32)  # RGB, dark red-brown


def astronaut_path() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-image is not installed: pip install --no-deps scikit-image==0.26.0"
                         " (or pass --astronaut PATH)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "astronaut.png"


def blink(h: int, w: int, eye: np.ndarray, amount: float, r: tuple[float, float]):
    """Source-y offsets (H, W) that squash content toward the eye line (inverse map)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    d = y - eye[1]
    win = np.exp(-((x - eye[0]) / r[0]) ** 2 - (d / r[1]) ** 2)
    k = 1.0 - 0.8 * amount * win  # local vertical scale, >= 0.2; 0.8 keeps the map monotone
    return d / k - d


def mouth_open(h: int, w: int, left: np.ndarray, right: np.ndarray, gap: float):
    """Source-y offsets and a mouth-interior alpha (H, W) for lips pulled `gap` px apart."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    centre = (left + right) / 2
    half_w = 0.6 * abs(right[0] - left[0])
    hx = gap / 2 * np.clip(1 - ((x - centre[0]) / half_w) ** 2, 0, None)  # lens-shaped half gap
    d = y - centre[1]
    u = np.maximum(np.abs(d) - hx, 0)  # distance outside the gap
    fall = np.where(d > 0, np.exp(-(u / (2.5 * half_w)) ** 2), np.exp(-(u / half_w) ** 2))
    src_d = np.where(np.abs(d) <= hx, 0.0, d - np.sign(d) * hx * fall)
    alpha = np.clip(hx - np.abs(d) + 0.5, 0, 1) * (hx > 0.5)
    return (src_d - d).astype(np.float32), alpha.astype(np.float32)


def frame_at(img: np.ndarray, lm, t: float) -> np.ndarray:
    """The driving frame at time t (seconds): local expression warp, then head motion + crop."""
    h, w = img.shape[:2]
    left, right = lm.points[3], lm.points[4]  # mouth corners (image left, image right)
    eye_r = (0.3 * (lm.box[2] - lm.box[0]), 0.09 * (lm.box[3] - lm.box[1]))
    b = min(1.0, sum(np.exp(-((t - tb) / 0.08) ** 2) for tb in (0.8, 2.1, 2.6)))  # three blinks
    m = 0.5 - 0.5 * np.cos(2 * np.pi * t / 1.5)  # mouth opens and closes twice
    dy = blink(h, w, lm.right_eye, b, eye_r) + blink(h, w, lm.left_eye, b, eye_r)
    mdy, alpha = mouth_open(h, w, left, right, gap=0.14 * (lm.box[3] - lm.box[1]) * m)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = cv2.remap(img, x, (y + dy + mdy).astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    out = out * (1 - alpha[..., None]) + MOUTH_COLOUR * alpha[..., None]

    # head motion about the face centre, then a square view 2.6x the face box, to SIZE px;
    # the photo's top edge is close above the hair, so the face sits a little above centre
    c = (lm.box[:2] + lm.box[2:]) / 2
    angle = 7.0 * np.sin(2 * np.pi * t / 3.0)
    scale = (1 + 0.07 * np.sin(2 * np.pi * t / 3.0 + 1.0)) * SIZE / (2.6 * (lm.box[3] - lm.box[1]))
    rot = cv2.getRotationMatrix2D((float(c[0]), float(c[1])), angle, scale)
    shift = np.array([14 * np.sin(2 * np.pi * t / 2.5 + 0.5), 8 * np.sin(2 * np.pi * t / 1.7)])
    rot[:, 2] += np.array([0.5 * SIZE, 0.44 * SIZE]) + shift - c  # face centre -> that point
    return cv2.warpAffine(np.clip(out + 0.5, 0, 255).astype(np.uint8), rot, (SIZE, SIZE),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--astronaut", type=Path, default=None, help="path to skimage's astronaut.png")
    ap.add_argument("--out", type=Path, default=Path("samples"))
    args = ap.parse_args()
    img = read_image(args.astronaut or astronaut_path())  # (512, 512, 3)
    lm = YuFaceLandmarker(max_side=512).detect(img)
    if lm is None:
        raise SystemExit("the landmarker found no face in astronaut.png")
    args.out.mkdir(parents=True, exist_ok=True)
    write_image(args.out / "source.png", resize(crop_square(img, lm, scale=2.2), SIZE))
    frames = [frame_at(img, lm, i / FPS) for i in range(int(SECONDS * FPS))]
    n = write_video(args.out / "driving.mp4", frames, FPS, crf=20)
    print(f"wrote {args.out}/source.png and {args.out}/driving.mp4 ({n} frames, {FPS} fps)")


if __name__ == "__main__":
    main()
