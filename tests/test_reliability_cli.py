"""Issue 14's rules on the commands added since: runtime.web, runtime.serve, bench.latency, bench.gpu_check,
bench.fidelity, models.rgbd convert and models.depth.

Each command is run as a subprocess with a bad flag or a bad path: exactly one `error: ...` line naming the
flag, no traceback, the documented exit code (1; bench.latency keeps its documented 2 for bad options), and
nothing written. Every case fails before a model is built, so the whole file is a few imports of torch.
`models.rgbd convert`: an output equal to its input (also through a symlink) is refused with the input
unchanged, and a convert that fails or is killed by SIGTERM mid-write leaves nothing under the final name
(an earlier file stays as it was) and no temp file.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

TIMEOUT = 120  # seconds per command; each one exits after its checks, long before this


def _run(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", XPORTRAIT_DEBUG="")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def _one_error_line(err: str) -> str:
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err, err
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    """Temp files models.fileio would leave if its cleanup failed (and the old fixed NAME.tmp)."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.startswith(".write-test"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def a_file(tmp_path) -> Path:
    """A plain file where a folder is expected: `--out FILE/sub` cannot be created."""
    f = tmp_path / "a_file"
    f.write_text("not a folder\n")
    return f


UNWRITABLE = Path("/sys/xportrait-reliability-test")  # sysfs: no new files, even for root


def _unwritable() -> bool:
    import tempfile
    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        return True
    os.close(fd)
    os.unlink(name)
    return False


# ------------------------------------------------------------------------------- one case per command
@pytest.mark.parametrize("args, code, names", [
    (["runtime.web", "--source", "{tmp}/missing.png"], 1, "--source"),
    (["runtime.serve", "--replicas", "0"], 1, "--replicas 0"),
    (["runtime.serve", "--config", "{tmp}/missing.yaml"], 1, "--config"),
    (["bench.latency", "--frames", "0", "--out", "{tmp}/bench"], 2, "--frames"),
    (["bench.latency", "--out", "{file}/sub"], 2, "--out"),
    (["bench.gpu_check", "--dry-run", "--out", "{file}/sub"], 1, "--out"),
    (["bench.gpu_check", "--dry-run", "--budget", "0", "--out", "{tmp}/gc"], 1, "--budget 0"),
    (["bench.fidelity", "--out", "{file}"], 1, "--out"),
    (["bench.fidelity", "--windows", "4", "16", "--out", "{tmp}/fid"], 1, "--windows 16"),
    (["bench.fidelity", "--checkpoint", "{tmp}/missing.th", "--out", "{tmp}/fid"], 1, "--checkpoint"),
    (["models.depth", "--taesd", "{tmp}/missing"], 1, "--taesd"),
    (["models.depth", "--taesd", "{tmp}", "--size", "100"], 1, "--size 100"),
    (["models.rgbd", "convert", "{tmp}/missing.th", "{tmp}/out.safetensors", "--preset", "tiny-rgbd"], 1, "IN "),
], ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None)
def test_bad_flag_or_path_gives_one_error_line(tmp_path, a_file, args, code, names):
    argv = [a.format(tmp=tmp_path, file=a_file) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = _run(*argv)
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    line = _one_error_line(proc.stderr)
    assert names in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no folder made
    assert a_file.read_text() == "not a folder\n"


@pytest.mark.parametrize("args, code", [
    (["bench.latency", "--no-baseline", "--out", str(UNWRITABLE)], 2),
    (["bench.gpu_check", "--dry-run", "--out", str(UNWRITABLE / "gc")], 1),
    (["bench.fidelity", "--out", str(UNWRITABLE)], 1),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_unwritable_output_folder_refused_before_work(args, code):
    if not _unwritable():
        pytest.skip("/sys accepts new files here: no unwritable folder to test with")
    proc = _run(*args)
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    line = _one_error_line(proc.stderr)
    assert "--out" in line and "cannot be" in line, line


def test_usage_errors_stay_argparse_exit_2():
    for cmd in (["bench.gpu_check", "--no-such-flag"], ["models.depth", "--no-such-flag"]):
        proc = _run(*cmd)
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert "error: unrecognized arguments: --no-such-flag" in proc.stderr and "Traceback" not in proc.stderr


def test_latency_output_that_is_an_input_is_refused(tmp_path):
    """--configs given as OUT/latency.json would be overwritten by the results: refused, file unchanged."""
    out = tmp_path / "bench"
    out.mkdir()
    configs = out / "latency.json"
    configs.write_text('[{"steps": 1}]\n')
    proc = _run("bench.latency", "--configs", str(configs), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "--out" in line and "is also an input" in line, line
    assert configs.read_text() == '[{"steps": 1}]\n' and sorted(p.name for p in out.iterdir()) == ["latency.json"]


# ------------------------------------------------------------------------------------- rgbd convert
@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory) -> Path:
    """A tiny-preset RGB checkpoint (default init: the values do not matter for file handling)."""
    import torch
    from safetensors.torch import save_file

    from models.config import XPortraitConfig
    from models.xportrait import XPortrait
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in XPortrait(XPortraitConfig.from_name("tiny")).state_dict().items()}
    path = tmp_path_factory.mktemp("rgb") / "rgb.safetensors"
    save_file(sd, str(path))
    return path


def test_convert_refuses_output_equal_to_input(rgb_checkpoint, tmp_path):
    src = tmp_path / "in.safetensors"
    src.write_bytes(rgb_checkpoint.read_bytes())
    link, hard = tmp_path / "link.safetensors", tmp_path / "hard.safetensors"
    link.symlink_to(src)
    os.link(src, hard)
    digest = _sha(src)
    for out in (src, link, hard, tmp_path / "." / "in.safetensors"):
        proc = _run("models.rgbd", "convert", str(src), str(out), "--preset", "tiny-rgbd")
        assert proc.returncode == 1, proc.stderr
        line = _one_error_line(proc.stderr)
        assert "OUT" in line and "is also an input" in line, line
    assert _sha(src) == digest and link.is_symlink() and _leftovers(tmp_path) == []


def test_convert_failure_leaves_nothing_under_the_final_name(rgb_checkpoint, tmp_path, monkeypatch):
    """A write that fails halfway (disk full) exits 1 with one error line; OUT is absent, or its earlier
    content when it existed; no temp file is left. The same convert then succeeds (no stale state)."""
    import errno

    import safetensors.torch

    from models.rgbd import main
    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    fresh, earlier = tmp_path / "fresh.safetensors", tmp_path / "earlier.safetensors"
    earlier.write_bytes(b"an earlier good output")
    for out in (fresh, earlier):
        assert main(["convert", str(rgb_checkpoint), str(out), "--preset", "tiny-rgbd"]) == 1
    assert not fresh.exists() and earlier.read_bytes() == b"an earlier good output"
    assert _leftovers(tmp_path) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert main(["convert", str(rgb_checkpoint), str(fresh), "--preset", "tiny-rgbd"]) == 0
    assert safetensors.torch.load_file(str(fresh))["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 8
    assert _leftovers(tmp_path) == []


INTERRUPT = """
import sys, time
from pathlib import Path
import safetensors.torch
def slow(tensors, filename, metadata=None):  # a long write: half a file, then wait for the signal
    Path(filename).write_bytes(b"partial")
    print("writing", filename, flush=True)
    time.sleep(60)
safetensors.torch.save_file = slow
from models.rgbd import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "existing"])
def test_convert_killed_by_sigterm_leaves_nothing_under_the_final_name(rgb_checkpoint, tmp_path, earlier):
    out = tmp_path / "out.safetensors"
    if earlier:
        out.write_bytes(b"an earlier good output")
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPT, "convert", str(rgb_checkpoint), str(out),
                             "--preset", "tiny-rgbd"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline()  # blocks until the temp file is half written
        assert line.startswith("writing "), (line, proc.stderr.read() if proc.poll() is not None else "")
        tmp = Path(line.split(" ", 1)[1].strip())
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.safetensors.") and tmp.exists()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert "SIGTERM" in _one_error_line(err)
    assert (out.read_bytes() == b"an earlier good output") if earlier else not out.exists()
    assert not tmp.exists() and _leftovers(tmp_path) == []
