"""Make the shipped sample inputs: samples/source.png and samples/driving.mp4 (deterministic).

Both come from scikit-image's `astronaut.png` (Eileen Collins, NASA; public domain, see
samples/README.md). Only the PNG file is read, so `pip install --no-deps scikit-image==0.26.0`
is enough. Run from the repository root:

    python -m scripts.make_samples            # or: --astronaut path/to/astronaut.png

The driving clip is a 3 s, 15 fps, 256x256 synthetic performance made by warping the still photo:
* head motion: a similarity transform (rotation, translation, scale) about the face centre,
  varied smoothly over time;
* blinks: the eye regions are squashed vertically toward the eye line (lids close);
* mouth: a jaw drop. Above the lip line (the lower edge of the upper teeth in this smiling
  photo) nothing moves; below it the lower lip, chin and jaw are displaced downward by a
  smooth, per-column monotone field, and the opened gap is filled with a dark mouth interior.
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
TONGUE_COLOUR = np.array([80, 20, 25], np.float32)  # RGB, added toward the lower lip


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


def lip_line(lm) -> tuple[float, float, float, float]:
    """Centre x, half width, corner y and centre sag (px) of the line where the lips part.

    In this photo the subject smiles with the upper teeth showing; the mouth parts along the
    lower edge of the upper teeth (the top of the lower lip). Measured on astronaut.png, zoomed:
    the dark mouth corners sit ~5 px right of and ~1.5 px above YuNet's corner points,
    and the line sags ~6 % of the face height at the centre (y 141 at the corners, 148 mid).
    """
    left, right = lm.points[3], lm.points[4]  # mouth corners (image left, image right)
    face_h = float(lm.box[3] - lm.box[1])
    return (float(left[0] + right[0]) / 2 + 5.0, abs(float(right[0] - left[0])) / 2,
            float(left[1] + right[1]) / 2 - 1.5, 0.0625 * face_h)


def mouth_open(h: int, w: int, lm, gap: float):
    """Source-y offsets and a mouth-interior alpha (H, W): the jaw drops by up to `gap` px.

    Everything above the lip line stays put. Below it the lower lip opens by a lens-shaped
    gap(x) (zero at the corners), the chin follows the jaw with a smooth horizontal fall-off,
    and the motion fades out below the chin; beside the mouth corners the skin stretches. The
    forward displacement is monotone along y in every column, so it is inverted exactly per
    column with np.interp. The alpha marks the opened gap (soft 1 px edges).
    """
    cx, hw, cy, sag = lip_line(lm)
    face_w, face_h = float(lm.box[2] - lm.box[0]), float(lm.box[3] - lm.box[1])
    xs = np.arange(w, dtype=np.float64)
    u = (xs - cx) / hw
    line = cy + sag * np.clip(1 - u ** 4, 0, None)  # lip line y(x); flat outside the corners
    g_lip = gap * np.clip(1 - u ** 2, 0, None) ** 0.75  # opening per column
    g_jaw = 0.85 * gap * np.exp(-((xs - cx) / (0.45 * face_w)) ** 2)  # chin / jaw drop per column
    chin = 0.27 * face_h  # lip line to chin bottom
    ys = np.arange(0, h, 0.25)  # fine source grid for the forward map
    v = ys[:, None] - line[None, :]  # (S, W) source distance below the lip line
    t = np.clip(v / (0.18 * face_h), 0, 1)
    t = t * t * (3 - 2 * t)  # lower lip -> jaw
    fade = np.exp(-(np.maximum(v - chin, 0) / (0.18 * face_h)) ** 2)
    disp = np.where(v >= 0, (g_lip + (g_jaw - g_lip) * t) * fade, 0.0)
    fwd = ys[:, None] + disp  # destination y of each source sample, monotone per column
    assert (np.diff(fwd, axis=0) > 0).all(), "mouth warp folds over"
    yd = np.arange(h, dtype=np.float64)
    src = np.stack([np.interp(yd, fwd[:, j], ys) for j in range(w)], 1)  # (H, W)
    vd = yd[:, None] - line[None, :]
    alpha = np.clip(vd + 0.5, 0, 1) * np.clip(g_lip[None, :] - vd + 0.5, 0, 1) * (g_lip > 0.5)
    return (src - yd[:, None]).astype(np.float32), alpha.astype(np.float32), line, g_lip


def mouth_interior(h: int, w: int, line: np.ndarray, g_lip: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 mouth-interior colour: shadow under the upper teeth, darker centre,
    a hint of tongue red toward the lower lip."""
    y = np.arange(h, dtype=np.float32)[:, None]
    s = np.clip((y - line[None, :]) / np.maximum(g_lip[None, :], 1.0), 0, 1)  # 0 top .. 1 bottom
    dark = np.exp(-((s - 0.35) / 0.35) ** 2)[..., None]
    return MOUTH_COLOUR * (1 - 0.55 * dark) + TONGUE_COLOUR * (0.6 * s ** 2)[..., None]


def frame_at(img: np.ndarray, lm, t: float) -> np.ndarray:
    """The driving frame at time t (seconds): local expression warp, then head motion + crop."""
    h, w = img.shape[:2]
    eye_r = (0.3 * (lm.box[2] - lm.box[0]), 0.09 * (lm.box[3] - lm.box[1]))
    b = min(1.0, sum(np.exp(-((t - tb) / 0.08) ** 2) for tb in (0.8, 2.1, 2.6)))  # three blinks
    m = 0.5 - 0.5 * np.cos(2 * np.pi * t / 1.5)  # mouth opens and closes twice
    dy = blink(h, w, lm.right_eye, b, eye_r) + blink(h, w, lm.left_eye, b, eye_r)
    mdy, alpha, line, g_lip = mouth_open(h, w, lm, gap=0.14 * (lm.box[3] - lm.box[1]) * m)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    # both maps float32 (OpenCV 5's remap hangs on mixed map dtypes)
    out = cv2.remap(img, x, (y + dy + mdy).astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    inside = mouth_interior(h, w, line, g_lip)
    out = out * (1 - alpha[..., None]) + inside * alpha[..., None]

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
