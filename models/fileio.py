"""Writing outputs safely: validate the path up front, write a temp file, rename it into place.

Every command writes its outputs (videos, images, ONNX graphs and their external data, engine plans
and sidecars, manifests, JSON) through `atomic_output` / `atomic_write`:

* the data goes to a hidden temp file in the destination folder (`.NAME.XXXXXXXX.tmp.EXT`; the
  extension is kept because writers such as FFmpeg and OpenCV pick the format from it);
* on success the file is flushed to disk and renamed over NAME with `os.replace`, which is atomic
  within one file system: a reader sees the old file or the new one, never a half-written one;
* on any exception, KeyboardInterrupt included, the temp file is removed and NAME is untouched.
  SIGTERM takes the same path once `models.cli.run_main` (every command's entry point) has turned
  it into an exception. Only SIGKILL or a power cut can leave a `.NAME.*.tmp.*` file behind, and
  never a partial NAME.

`check_output_path` validates an output path before the expensive work: not a folder, a known
extension, a folder that exists or can be made and is writable, and not one of the inputs (by
real path and by inode, so hard links and symlinks count).

This module sits in models/ (the lowest layer) so every package may import it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


class OutputPathError(ValueError):
    """An output path cannot be written; the message names the path, the option and the fix."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_name(path: Path, suffix: str | None = None) -> tuple[str, str]:
    """(prefix, suffix) of the temp files for `path`: `.NAME.` and `.tmp` + the extension."""
    return f".{path.name}.", ".tmp" + (path.suffix if suffix is None else suffix)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_output(path: str | Path, suffix: str | None = None, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it to `path` if the block succeeds, else delete it.

    suffix: the temp file's extension (default: `path`'s, so format-by-extension writers work).
    The parent folder is created if needed. The temp file exists (empty) when the block starts;
    writers may overwrite or replace it. The result gets the usual mode (0666 & ~umask) whatever the
    writer left (mkstemp and some writers make 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, sfx = temp_name(path, suffix)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=sfx)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"the writer left no file for {path} (expected {tmp})")
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_outputs(paths: Iterable[str | Path], suffix: str | None = None) -> Iterator[list[Path]]:
    """`atomic_output` for several files written together: every temp is kept or every temp removed.

    The renames happen in reverse order of `paths` once the block succeeds, so list the file that
    refers to the others (a graph before its external data, a video before its preview) first: it
    replaces its old version last.
    """
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_output(p, suffix)) for p in paths]


def atomic_write(path: str | Path, data, suffix: str = "") -> None:
    """Write bytes / str / a buffer to `path` atomically (temp file `.NAME.XXXXXXXX.tmp`)."""
    if isinstance(data, str):
        data = data.encode()
    with atomic_output(path, suffix=suffix, fsync=False) as tmp:
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | Path, obj, indent: int = 1) -> None:
    import json
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")


# ------------------------------------------------------------------------------- validation
def _nearest_existing(folder: Path) -> Path:
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_folder(folder: str | Path, flag: str = "--out", shown: str | Path | None = None) -> Path:
    """The folder exists (or can be made: its nearest existing ancestor is a folder) and is writable.

    Writability is probed by creating and removing a temp file, so it also holds for root and for
    read-only mounts. Nothing is created when the folder does not exist yet. `shown`: the path the
    user gave (e.g. the output file), for messages.
    """
    folder = Path(folder)
    shown = folder if shown is None else shown
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise OutputPathError(f"{flag} {shown}: {base} is a file, not a folder; choose another output folder")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = f"{folder} cannot be written" if base == folder else \
            f"{folder} cannot be created ({base} cannot be written)"
        raise OutputPathError(f"{flag} {shown}: the folder {what}: {e.strerror}; "
                              "choose a folder you can write to") from None
    return folder


def check_output_path(path: str | Path, allowed_exts: Iterable[str] | None = None,
                      inputs: Iterable[str | Path | None] = (), flag: str = "--out") -> Path:
    """Validate an output file path before any work; raise OutputPathError naming `flag` and the fix.

    allowed_exts: e.g. (".mp4", ".mov"), compared case-insensitively; None accepts any.
    inputs: paths the command reads (None entries are skipped); the output must not be one of them.
    """
    path = Path(path)
    if str(path).endswith(("/", os.sep)) or path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give a file name inside it"
                              + (f", e.g. {path / ('out' + next(iter(allowed_exts)))}" if allowed_exts else ""))
    if allowed_exts is not None:
        exts = tuple(allowed_exts)
        if path.suffix.lower() not in exts:
            raise OutputPathError(f"{flag} {path}: unknown extension {path.suffix or '(none)'!r}; "
                                  f"use one of {', '.join(exts)}")
    for src in inputs:
        if src is not None and _same_file(path, Path(src)):
            raise OutputPathError(f"{flag} {path} is also an input ({src}); writing it would overwrite the "
                                  "input: choose another output name")
    check_output_folder(path.parent, flag, shown=path)
    return path
