"""Video/image IO: round trips keep frame count and fps; odd sizes, alpha and grayscale work."""

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from runtime.video_io import iter_video, read_image, read_video, to_uint8_frames, video_fps, write_image, write_video

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _gradient_frames(n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w, 3) uint8: smooth content that H.264 keeps almost exactly, different per frame."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                        np.full_like(x, 20 * i)], -1) for i in range(n)]
    return np.stack(frames).astype(np.uint8)


def _write_lossless(path: Path, frames: np.ndarray, pix_fmt: str, codec: str = "ffv1",
                    pts: list[int] | None = None, src_format: str = "rgb24") -> None:
    """A lossless test clip written straight with PyAV (rate 10 fps unless pts say otherwise)."""
    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        s.time_base = Fraction(1, 10)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format=src_format)
            vf.pts = i if pts is None else pts[i]
            vf.time_base = Fraction(1, 10)
            c.mux(s.encode(vf))
        c.mux(s.encode(None))


@pytest.mark.parametrize("fps", [12, 25, 29.97])
def test_mp4_round_trip_keeps_count_and_fps(tmp_path, fps):
    frames = _gradient_frames(17, 48, 64)
    path = tmp_path / "clip.mp4"
    assert write_video(path, frames, fps) == 17
    video = read_video(path)
    assert video.frames.shape == (17, 48, 64, 3) and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(fps, rel=1e-4)
    assert video_fps(path) == pytest.approx(fps, rel=1e-4)
    err = np.abs(video.frames.astype(int) - frames.astype(int)).mean()
    assert err < 3.0, err
    with av.open(str(path)) as c:  # the container holds what the reference writes (§7.3)
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")


def test_odd_size_is_padded_to_even_on_write(tmp_path):
    frames = _gradient_frames(5, 21, 33)
    write_video(tmp_path / "odd.mp4", frames, 10)
    out = read_video(tmp_path / "odd.mp4").frames
    assert out.shape == (5, 22, 34, 3)
    # the padding repeats the last row/column, so it matches its neighbour
    assert np.abs(out[:, :21, 33].astype(int) - out[:, :21, 32].astype(int)).mean() < 4
    # 4:2:0 chroma on a steep 33-px colour ramp costs a few levels more than on the 64-px one
    assert np.abs(out[:, :21, :33].astype(int) - frames.astype(int)).mean() < 6


def test_odd_size_video_is_read_at_its_size(tmp_path):
    frames = _gradient_frames(4, 21, 33)
    _write_lossless(tmp_path / "odd.mkv", frames, "bgr0")
    np.testing.assert_array_equal(read_video(tmp_path / "odd.mkv").frames, frames)


def test_every_frame_is_decoded_even_with_timestamp_gaps(tmp_path):
    frames = _gradient_frames(6, 16, 16)
    _write_lossless(tmp_path / "vfr.mkv", frames, "bgr0", pts=[0, 1, 2, 9, 10, 30])
    np.testing.assert_array_equal(read_video(tmp_path / "vfr.mkv").frames, frames)
    assert sum(1 for _ in iter_video(tmp_path / "vfr.mkv")) == 6


def test_alpha_video_is_composited_on_white(tmp_path):
    rgba = np.zeros((3, 8, 10, 4), np.uint8)
    rgba[..., 0] = 200                 # red everywhere ...
    rgba[:, :, :5, 3] = 255            # ... opaque on the left half, transparent on the right
    rgba[:, :, 5, 3] = 128             # one half-transparent column
    _write_lossless(tmp_path / "alpha.mov", rgba, "rgba", codec="png", src_format="rgba")
    out = read_video(tmp_path / "alpha.mov").frames
    assert out.shape == (3, 8, 10, 3)
    np.testing.assert_array_equal(out[:, :, :5], np.broadcast_to([200, 0, 0], (3, 8, 5, 3)))
    np.testing.assert_array_equal(out[:, :, 6:], 255)
    np.testing.assert_allclose(out[:, :, 5].astype(int), [[[227, 127, 127]] * 8] * 3, atol=1)
    black = read_video(tmp_path / "alpha.mov", background=0).frames
    np.testing.assert_array_equal(black[:, :, 6:], 0)


def test_grayscale_video_gives_three_equal_channels(tmp_path):
    gray = _gradient_frames(3, 12, 14)[..., :1].copy()
    _write_lossless(tmp_path / "gray.mkv", gray[..., 0], "gray", src_format="gray")
    out = read_video(tmp_path / "gray.mkv").frames
    np.testing.assert_array_equal(out, np.repeat(gray, 3, axis=-1))


def test_images_gray_alpha_16bit(tmp_path):
    gray = np.arange(15 * 7, dtype=np.uint8).reshape(15, 7)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), np.repeat(gray[..., None], 3, -1))

    bgra = np.zeros((5, 9, 4), np.uint8)
    bgra[..., 2] = 90                  # red in BGR order
    bgra[:, :4, 3] = 255
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    rgb = read_image(tmp_path / "a.png")
    assert rgb.shape == (5, 9, 3)
    np.testing.assert_array_equal(rgb[:, :4], np.broadcast_to([90, 0, 0], (5, 4, 3)))
    np.testing.assert_array_equal(rgb[:, 4:], 255)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", background=0)[:, 4:], 0)

    deep = np.full((4, 4, 3), 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    np.testing.assert_array_equal(read_image(tmp_path / "d.png"), 255)


def test_image_round_trip_odd_size(tmp_path):
    img = _gradient_frames(1, 13, 11)[0]
    write_image(tmp_path / "x.png", img)
    np.testing.assert_array_equal(read_image(tmp_path / "x.png"), img)


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "empty.mp4", [], 10)
    with pytest.raises(ValueError, match="first was"):
        write_video(tmp_path / "mixed.mp4", [np.zeros((8, 8, 3), np.uint8),
                                             np.zeros((8, 10, 3), np.uint8)], 10)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", [np.zeros((8, 8, 3), np.float32)], 10)


def test_to_uint8_frames_maps_minus_one_to_one():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(2, 3, 1, 4)
    out = to_uint8_frames(x)
    assert out.shape == (2, 1, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 128, 255, 255])


def test_shipped_samples_decode():
    video = read_video(SAMPLES / "driving.mp4")
    assert video.frames.shape == (45, 256, 256, 3)
    assert video.fps == pytest.approx(15.0)
    assert read_image(SAMPLES / "source.png").shape == (256, 256, 3)
