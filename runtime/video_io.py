"""Video and image reading/writing: PyAV (bundled FFmpeg) for video, OpenCV for stills.

Every reader returns uint8 RGB (H, W, 3) frames, whatever the file holds:
* grayscale is replicated to three channels;
* alpha is composited over a flat `background` (white by default, docs/preprocessing.md says
  why): the RGB under transparent pixels is undefined in many cut-out PNGs, so dropping alpha
  (what the reference's "first 3 channels" does) can expose garbage;
* 16-bit images are scaled to 8 bits;
* odd sizes are kept as they are.
Video readers decode every frame in stream order (no timestamp-based dropping or duplication)
and report the stream's average frame rate.

`write_video` writes H.264 (libx264) yuv420p mp4, the format the reference script writes (§7.3).
yuv420p needs even sizes, so odd widths/heights are padded by repeating the last column/row.
Writers are atomic (models/fileio.py): a temp file in the destination folder, renamed on success,
removed on failure or interruption. Unreadable inputs raise ValueError naming the file and the fix,
never a raw FFmpeg error number.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import torch

from models.fileio import atomic_output

VIDEO_EXTS = (".mp4", ".mov", ".mkv")  # containers that take H.264
DEFAULT_FPS = 25.0  # for streams that declare no rate (e.g. a single still decoded as video)


@dataclass
class Video:
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    fps: float


def read_image(path: str | Path, background: int = 255) -> np.ndarray:
    """Read a still image as (H, W, 3) uint8 RGB. Alpha is composited over `background`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: '{path}'")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"could not decode image '{path}' (OpenCV reads png/jpg/bmp/tiff/webp)")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {img.dtype} in '{path}'")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.shape[2] == 2:  # gray + alpha
        img = np.concatenate([np.repeat(img[:, :, :1], 3, axis=2), img[:, :, 1:]], axis=2)
        return composite(img, background)
    rgb = img[:, :, 2::-1] if img.shape[2] == 3 else img[:, :, [2, 1, 0, 3]]
    return composite(rgb, background) if rgb.shape[2] == 4 else np.ascontiguousarray(rgb)


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image atomically; the format follows the extension."""
    if not cv2.haveImageWriter(str(path)):
        raise ValueError(f"cannot write image '{path}': unknown extension {Path(path).suffix!r}; use .png or .jpg")
    with atomic_output(path) as tmp:
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(image[:, :, ::-1])):
            raise OSError(f"could not write image '{path}' (OpenCV's imwrite failed: disk full or unwritable?)")


def composite(rgba: np.ndarray, background: int = 255) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8, straight (non-premultiplied) alpha over a flat colour."""
    a = rgba[:, :, 3:4].astype(np.float32) / 255.0
    out = rgba[:, :, :3].astype(np.float32) * a + float(background) * (1.0 - a)
    return (out + 0.5).astype(np.uint8)


def _unreadable(path, e: Exception) -> ValueError:
    why = getattr(e, "strerror", None) or str(e)
    return ValueError(f"cannot read video '{path}': {why}. It is not a video FFmpeg can decode, or it is "
                      "truncated or corrupt: re-encode it (e.g. ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4) "
                      "or copy it again")


def _open(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: '{path}'" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        if isinstance(e, PermissionError):
            raise PermissionError(f"cannot read video '{path}': permission denied") from None
        raise _unreadable(path, e) from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"'{path}' has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else DEFAULT_FPS


def _to_rgb(frame: "av.VideoFrame", background: int) -> np.ndarray:
    if any(c.is_alpha for c in frame.format.components):
        return composite(frame.to_ndarray(format="rgba"), background)
    return frame.to_ndarray(format="rgb24")


def iter_video(path: str | Path, background: int = 255) -> Iterator[np.ndarray]:
    """Yield every frame of the first video stream as (H, W, 3) uint8 RGB."""
    container, stream = _open(path)
    with container:
        try:
            for frame in container.decode(stream):
                yield _to_rgb(frame, background)
        except av.error.FFmpegError as e:
            raise _unreadable(path, e) from None


def video_fps(path: str | Path) -> float:
    """The average frame rate the first video stream declares."""
    container, stream = _open(path)
    with container:
        return _fps(stream)


def read_video(path: str | Path, background: int = 255) -> Video:
    """Read every frame of a video (or an animated/still image FFmpeg can decode)."""
    container, stream = _open(path)
    with container:
        fps = _fps(stream)
        try:
            frames = [_to_rgb(f, background) for f in container.decode(stream)]
        except av.error.FFmpegError as e:
            raise _unreadable(path, e) from None
    if not frames:
        raise ValueError(f"'{path}' decoded to zero frames")
    return Video(np.stack(frames), fps)


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float, crf: int = 18) -> int:
    """Write (H, W, 3) uint8 RGB frames as H.264 yuv420p mp4. Returns the number of frames.

    Odd sizes are padded to even by repeating the last row/column. `fps` may be fractional
    (29.97 is stored as 30000/1001). Atomic: nothing appears under `path` unless every frame was
    written; an earlier file there stays until then.
    """
    if Path(path).suffix.lower() not in VIDEO_EXTS:
        raise ValueError(f"cannot write video '{path}': use one of {', '.join(VIDEO_EXTS)}")
    if not (fps > 0 and np.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps}")
    with atomic_output(path) as tmp:
        return _write_video(tmp, frames, fps, crf, path)


def _write_video(path: Path, frames: Iterable[np.ndarray], fps: float, crf: int, final: str | Path) -> int:
    rate = Fraction(fps).limit_denominator(1001)
    container = av.open(str(path), mode="w")
    n = 0
    with container:
        stream = None
        for frame in frames:
            frame = np.asarray(frame)
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"frames must be (H, W, 3) uint8, got {frame.dtype} {frame.shape}")
            h, w = frame.shape[:2]
            if stream is None:
                size = (h, w)
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height = w + w % 2, h + h % 2
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf)}
            elif (h, w) != size:
                raise ValueError(f"frame {n} is {w}x{h}, the first was {size[1]}x{size[0]}")
            if h % 2 or w % 2:
                frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            container.mux(stream.encode(vf))
            n += 1
        if stream is None:
            raise ValueError(f"no frames to write to '{final}'")
        container.mux(stream.encode(None))  # flush delayed (B-)frames
    return n


def to_uint8_frames(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8, the §7.3 output mapping."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
