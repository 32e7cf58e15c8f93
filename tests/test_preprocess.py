"""Preprocessing geometry (spec §4.2, §6.4, §7): re-framing affine, best frame, local patches.

Geometry tests use drawn faces whose five "landmarks" are discs of pure colour, found by
`MarkerLandmarker`, so every position is known exactly. The real landmarker runs on the shipped
sample at the end.
"""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from runtime.landmarks import Landmarks, YuFaceLandmarker
from runtime.preprocess import (
    NO_REFRAME,
    DrivingPreprocessor,
    NoFaceError,
    best_frame_index,
    crop_square,
    local_patch_hint,
    patch_centres,
    preprocess,
    reframe_affine,
    to_tensor,
    warp,
)
from runtime.video_io import read_image, read_video

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
# right eye (image left), left eye, nose, mouth corner image-left, mouth corner image-right
MARKERS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]])
LAYOUT = np.array([[-0.4, -0.3], [0.4, -0.3], [0.0, 0.1], [-0.3, 0.5], [0.3, 0.5]])  # face units


class MarkerLandmarker:
    """Finds the five marker discs; None unless all five are present."""

    def detect(self, image: np.ndarray) -> Landmarks | None:
        pts = []
        for colour in MARKERS:
            mask = np.abs(image.astype(int) - colour).sum(-1) < 90
            if mask.sum() < 4:
                return None
            ys, xs = np.nonzero(mask)
            pts.append([xs.mean(), ys.mean()])
        p = np.array(pts, np.float32)
        centre, half = (p.min(0) + p.max(0)) / 2, (p.max(0) - p.min(0)) / 2
        box = np.concatenate([centre - 1.5 * half, centre + 1.5 * half]).astype(np.float32)
        return Landmarks(points=p, left_eye=p[1], right_eye=p[0], mouth=(p[3] + p[4]) / 2, box=box)


def draw_face(size: int | tuple[int, int], centre, scale, bg: int = 90) -> np.ndarray:
    """(H, W, 3) uint8 face with marker landmarks at centre + LAYOUT * scale (scale: x, y)."""
    h, w = (size, size) if isinstance(size, int) else size
    img = np.full((h, w, 3), bg, np.uint8)
    c, s = np.asarray(centre, float), np.broadcast_to(np.asarray(scale, float), (2,))
    cv2.ellipse(img, (int(c[0]), int(c[1] + 0.1 * s[1])), (int(0.7 * s[0]), int(0.9 * s[1])),
                0, 0, 360, (200, 170, 150), -1)
    r = max(2, int(0.08 * min(s)))
    for p, colour in zip(c + LAYOUT * s, MARKERS):
        cv2.circle(img, (round(p[0]), round(p[1])), r, [int(v) for v in colour], -1,
                   lineType=cv2.LINE_AA)
    return img


def expected_points(centre, scale) -> np.ndarray:
    return np.asarray(centre, float) + LAYOUT * np.broadcast_to(np.asarray(scale, float), (2,))


def test_reframe_affine_maps_driving_box_onto_source_box():
    def lm(x0, y0, x1, y1):
        box = np.array([x0, y0, x1, y1], np.float32)
        p = np.array([[x0, y0], [x1, y1]], np.float32)
        return Landmarks(points=p, left_eye=p[0], right_eye=p[1], mouth=p[0], box=box)
    src, drv = lm(60, 50, 140, 150), lm(40, 55, 80, 105)
    m = reframe_affine(src, drv)
    np.testing.assert_allclose(m, [[2, 0, -20], [0, 2, -60]], atol=1e-5)  # anisotropic allowed
    moved = drv.transformed(m)
    np.testing.assert_allclose(moved.box, src.box, atol=1e-4)
    np.testing.assert_allclose(reframe_affine(src, lm(40, 55, 80, 80))[1, 1], 4.0)


def test_landmarks_transform():
    lm = MarkerLandmarker().detect(draw_face(128, (64, 64), 40))
    twice = lm.transformed(np.array([[2, 0, 0], [0, 3, 0]], np.float32))
    np.testing.assert_allclose(twice.points, lm.points * [2, 3], rtol=1e-6)
    np.testing.assert_allclose(twice.box, lm.box * [2, 3, 2, 3], rtol=1e-6)
    np.testing.assert_allclose(lm.centres(), [lm.left_eye, lm.right_eye, lm.mouth])


def test_marker_landmarker_finds_the_drawn_points():
    lm = MarkerLandmarker().detect(draw_face(128, (60, 70), (40, 30)))
    np.testing.assert_allclose(lm.points, expected_points((60, 70), (40, 30)), atol=0.7)
    assert MarkerLandmarker().detect(np.full((64, 64, 3), 90, np.uint8)) is None


def test_driving_is_reframed_onto_the_source_face():
    res = 128
    source = draw_face(res, (64, 60), 30)
    # driving face: smaller, off-centre and anisotropic; the affine must undo all of it
    frames = [draw_face((96, 160), (50 + 2 * i, 40), (20, 14)) for i in range(4)]
    out = preprocess(source, frames, resolution=res, best_frame=0,
                     landmarker=MarkerLandmarker(), crop_source=False)
    aligned = (out.driving[0].permute(1, 2, 0).numpy() * 127.5 + 127.5).round().astype(np.uint8)
    got = MarkerLandmarker().detect(aligned)
    want = MarkerLandmarker().detect(source)
    np.testing.assert_allclose(got.points, want.points, atol=1.5)
    assert out.best_frame == 0 and out.found.all()
    # the local-patch centres follow the moving face, in aligned coordinates
    dx = out.centres[-1, :, 0] - out.centres[0, :, 0]
    np.testing.assert_allclose(dx, 6 * (res / 160) * out.affine[0, 0], atol=1.0)


def test_outputs_are_float_nchw_in_range_at_requested_resolution():
    out = preprocess(draw_face(200, (100, 90), 60), [draw_face(150, (75, 70), 60)] * 3,
                     resolution=64, landmarker=MarkerLandmarker())
    for t, n in ((out.source, 1), (out.driving, 3), (out.local, 3)):
        assert t.dtype == torch.float32 and t.shape == (n, 3, 64, 64) and t.is_contiguous()
        assert t.min() >= -1 and t.max() <= 1
    assert out.affine.shape == (2, 3) and out.centres.shape == (3, 3, 2)


def test_best_frame_is_the_closest_landmark_set():
    res = 96
    source = draw_face(res, (48, 48), 22)
    frames = [draw_face(res, (48 + d, 48), 22) for d in (12, -7, 1, 9)]
    out = preprocess(source, frames, resolution=res, landmarker=MarkerLandmarker(),
                     crop_source=False)
    assert out.best_frame == 2
    lms = [MarkerLandmarker().detect(f) for f in frames]
    assert best_frame_index(lms[2], [None, lms[0], lms[2]]) == 2


def test_no_reframe_gives_identity_and_keeps_frames():
    frames = [draw_face(64, (30, 34), 12)]
    out = preprocess(draw_face(64, (32, 32), 14), frames, resolution=64, best_frame=NO_REFRAME,
                     landmarker=MarkerLandmarker(), crop_source=False)
    np.testing.assert_array_equal(out.affine, np.eye(2, 3))
    torch.testing.assert_close(out.driving, to_tensor(np.stack(frames)))


def test_local_patch_hint_layout():
    res, hs = 64, 8
    frame = torch.rand(3, res, res) * 2 - 1
    centres = patch_centres(np.array([[20.4, 20.0], [26.0, 20.0], [40.0, 50.6]]), res)
    np.testing.assert_array_equal(centres, [[20, 20], [26, 20], [40, 51]])
    hint = local_patch_hint(frame, centres)
    mask = torch.zeros(res, res, dtype=torch.bool)
    for x, y in centres:
        mask[y - hs:y + hs, x - hs:x + hs] = True
    assert mask[12:28, 12:34].all() and mask.sum() == 16 * 22 + 16 * 16  # overlapping eye patches
    torch.testing.assert_close(hint[:, mask], frame[:, mask])
    assert (hint[:, ~mask] == -1).all()


def test_patch_centres_are_clipped_inside_the_image():
    res = 128  # half-size 16
    c = patch_centres(np.array([[-5.0, 3.0], [200.0, 127.0], [64.0, 64.0]]), res)
    np.testing.assert_array_equal(c, [[16, 16], [112, 112], [64, 64]])
    hint = local_patch_hint(torch.zeros(3, res, res), c)
    assert (hint == 0).sum() == 3 * 3 * 32 * 32  # three whole, non-overlapping 32x32 patches


def test_frames_without_a_face_reuse_the_last_good_centres():
    res = 64
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
    noise[np.abs(noise.astype(int)[..., None, :] - MARKERS).sum(-1).min(-1) < 90] = 128
    blank = np.zeros((res, res, 3), np.uint8)
    a, b = draw_face(res, (24, 30), 12), draw_face(res, (40, 30), 12)
    out = preprocess(a, [blank, a, noise, b, blank], resolution=res, landmarker=MarkerLandmarker(),
                     crop_source=False)
    np.testing.assert_array_equal(out.found, [False, True, False, True, False])
    c = out.centres
    np.testing.assert_array_equal(c[0], c[1])  # before the first face: the first good centres
    np.testing.assert_array_equal(c[2], c[1])  # no face: last good
    np.testing.assert_array_equal(c[4], c[3])
    assert (c[3] != c[1]).any()


def test_clip_without_any_face_raises_a_clear_error():
    blank = [np.zeros((32, 32, 3), np.uint8)] * 3
    with pytest.raises(NoFaceError, match="no face found in any of the 3 driving frames"):
        preprocess(draw_face(64, (32, 32), 14), blank, resolution=32, landmarker=MarkerLandmarker())


def test_source_without_face_and_bad_best_frame_raise():
    face = draw_face(64, (32, 32), 14)
    blank = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(NoFaceError, match="crop_source=False"):
        preprocess(blank, [face], resolution=64, landmarker=MarkerLandmarker())
    with pytest.raises(ValueError, match="out of range for 2 driving frames"):
        preprocess(face, [face, face], resolution=64, best_frame=2, landmarker=MarkerLandmarker())
    with pytest.raises(NoFaceError, match="best_frame=1"):
        preprocess(face, [face, blank], resolution=64, best_frame=1, landmarker=MarkerLandmarker())


def test_crop_square_stays_inside_and_is_square():
    img = draw_face((120, 200), (30, 40), 20)
    lm = MarkerLandmarker().detect(img)
    crop = crop_square(img, lm, scale=2.0)
    assert crop.shape[0] == crop.shape[1] == round(2.0 * (lm.box[3] - lm.box[1]))
    assert MarkerLandmarker().detect(crop) is not None
    assert crop_square(img, lm, scale=50).shape[:2] == (120, 120)  # shrunk to fit


def test_streaming_preprocessor_needs_a_face_first():
    step = DrivingPreprocessor(64, landmarker=MarkerLandmarker())
    with pytest.raises(NoFaceError, match="start with the face in view"):
        step(np.zeros((64, 64, 3), np.uint8))
    pose, local, found = step(draw_face(64, (32, 32), 14))
    assert found and pose.shape == local.shape == (3, 64, 64)
    _, local2, found2 = step(np.zeros((64, 64, 3), np.uint8))
    assert not found2 and (local2 == -1).any()
    with pytest.raises(ValueError, match="resize"):
        step(np.zeros((32, 32, 3), np.uint8))


def test_warp_uses_black_border():
    img = np.full((16, 16, 3), 200, np.uint8)
    out = warp(img, np.array([[1, 0, 4], [0, 1, 0]], np.float32))
    assert (out[:, :4] == 0).all() and (out[:, 5:] == 200).all()


# --- the real landmarker ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample():
    return read_image(SAMPLES / "source.png"), read_video(SAMPLES / "driving.mp4").frames


def test_real_landmarker_on_shipped_sample(sample):
    source, frames = sample
    landmarker = YuFaceLandmarker()
    lm = landmarker.detect(source)
    assert lm is not None
    assert lm.left_eye[0] > lm.right_eye[0]       # subject's left eye is on the image right
    assert lm.mouth[1] > max(lm.left_eye[1], lm.right_eye[1]) + 10
    assert lm.box[0] < lm.right_eye[0] < lm.left_eye[0] < lm.box[2]
    found = [landmarker.detect(f) is not None for f in frames[::3]]
    assert sum(found) >= len(found) - 1, found
    assert landmarker.detect(np.zeros((256, 256, 3), np.uint8)) is None
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert landmarker.detect(noise) is None


def test_preprocess_shipped_sample_with_real_landmarker(sample):
    source, frames = sample
    out = preprocess(source, frames[::4], resolution=256)
    assert out.found.sum() >= len(out.found) - 1
    src_lm = YuFaceLandmarker().detect(to_uint8(out.source[0]))
    drv_lm = YuFaceLandmarker().detect(to_uint8(out.driving[out.best_frame]))
    # after re-framing, the best frame's face box sits on the source's face box
    np.testing.assert_allclose(drv_lm.box, src_lm.box, atol=8)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
