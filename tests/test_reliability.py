"""Issue 14: every command writes atomically, never overwrites an input, refuses bad input early
with one `error: ...` line, catches NaN/Inf, and ends cleanly on Ctrl-C / SIGTERM.

One test per failure class of the issue. CPU only (tiny preset, a few frames); the interrupted
writes run in subprocesses because they are killed by a real signal.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models import cli
from models.fileio import OutputPathError, atomic_output, atomic_outputs, check_output_path
from models.finite import FiniteMonitor, NonFiniteError, check_finite
from tests.conftest import ROOT

SAMPLES = ROOT / "samples"
NAN = float("nan")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend on shared cores


def _one_error_line(err: str) -> str:
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    """Temp files models.fileio leaves if a cleanup failed."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.startswith(".write-test"))


def _unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write to (root ignores permission bits: then /sys, if it is read-only)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        return d
    try:
        check_output_path(Path("/sys/probe.mp4"), None)
    except OutputPathError:
        return Path("/sys")
    pytest.skip("running as root and /sys is writable: no folder here refuses writes")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from runtime.video_io import read_video, write_video
    if not (SAMPLES / "driving.mp4").is_file():
        pytest.skip("samples/driving.mp4 missing (python -m scripts.make_samples)")
    path = tmp_path_factory.mktemp("clip") / "driving.mp4"
    write_video(path, read_video(SAMPLES / "driving.mp4").frames[:2], 10)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A complete tiny X-Portrait checkpoint (CLIP included) with seeded random values."""
    from safetensors.torch import save_file

    from models.config import XPortraitConfig
    from models.init import init_random_
    from models.xportrait import XPortrait
    model = init_random_(XPortrait(XPortraitConfig.from_name("tiny"), with_text_encoder=True), seed=2)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# ------------------------------------------------------------------------- atomic outputs
def test_atomic_output_keeps_the_earlier_file_on_failure_and_replaces_it_on_success(tmp_path):
    out = tmp_path / "result.json"
    out.write_text("good")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(out) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp != out
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert out.read_text() == "good" and _leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert out.read_text() == "good" and _leftovers(tmp_path) == []
    with atomic_output(out) as tmp:
        tmp.write_text("new")
        tmp.chmod(0o600)  # as mkstemp and some writers (safetensors) leave it
    assert out.read_text() == "new" and _leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not the temp file's 0600


def test_atomic_outputs_replace_all_or_none(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "a_preview.mp4"
    a.write_text("old a")
    b.write_text("old b")
    with pytest.raises(ValueError):
        with atomic_outputs([a, b]) as (ta, tb):
            ta.write_text("new a")
            raise ValueError("the preview failed")
    assert (a.read_text(), b.read_text()) == ("old a", "old b") and _leftovers(tmp_path) == []
    with atomic_outputs([a, b]) as (ta, tb):
        ta.write_text("new a")
        tb.write_text("new b")
    assert (a.read_text(), b.read_text()) == ("new a", "new b")


def test_animate_write_outputs_is_atomic(tmp_path, monkeypatch):
    """A failure while writing the preview leaves the earlier animation and preview untouched."""
    import runtime.video_io as vio
    from runtime.animate import write_outputs
    out, preview = tmp_path / "anim.mp4", tmp_path / "anim_preview.mp4"
    out.write_bytes(b"earlier animation")
    preview.write_bytes(b"earlier preview")
    real, calls = vio.write_video, []

    def flaky(path, frames, fps, crf=18):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, frames, fps, crf)
    monkeypatch.setattr(vio, "write_video", flaky)
    img = torch.zeros(2, 3, 16, 16)
    with pytest.raises(OSError):
        write_outputs(out, img, img[:1], img, 10.0, preview=True, caption=False)
    assert len(calls) == 2 and calls[0] != out  # the animation itself went to a temp name
    assert out.read_bytes() == b"earlier animation" and preview.read_bytes() == b"earlier preview"
    assert _leftovers(tmp_path) == []


def test_onnx_save_is_atomic_with_external_data(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from export.to_onnx import Graph, save
    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    graph = Graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    path = tmp_path / "g.onnx"
    assert save(graph, path, external_bytes=0) == [path, tmp_path / "g.onnx.data"]
    loaded = onnx.load(str(path))  # the graph names the final data file, not a temp
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), numpy_helper.to_array(w))
    before = path.read_bytes(), (tmp_path / "g.onnx.data").read_bytes()

    def broken(self, t):
        raise KeyboardInterrupt
    monkeypatch.setattr(Graph, "array", broken)
    with pytest.raises(KeyboardInterrupt):
        save(graph, path, external_bytes=0)
    assert (path.read_bytes(), (tmp_path / "g.onnx.data").read_bytes()) == before
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- output path validation
def test_check_output_path_refuses_bad_paths_up_front(tmp_path):
    src = tmp_path / "in.mp4"
    src.write_bytes(b"input")
    with pytest.raises(OutputPathError, match="--out .* is a folder"):
        check_output_path(tmp_path, (".mp4",))
    with pytest.raises(OutputPathError, match=r"unknown extension '\.avi'.*\.mp4"):
        check_output_path(tmp_path / "x.avi", (".mp4", ".mov"))
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_output_path(src / "x.mp4", (".mp4",))
    for alias in (src, tmp_path / "." / "in.mp4", tmp_path / "link.mp4", tmp_path / "hard.mp4"):
        if alias.name == "link.mp4":
            alias.symlink_to(src)
        elif alias.name == "hard.mp4":
            os.link(src, alias)
        with pytest.raises(OutputPathError, match="also an input"):
            check_output_path(alias, (".mp4",), inputs=[None, src])
    with pytest.raises(OutputPathError, match="cannot be"):
        check_output_path(_unwritable_dir(tmp_path) / "sub" / "x.mp4", (".mp4",))
    assert check_output_path(tmp_path / "new" / "deeper" / "x.MP4", (".mp4",)).name == "x.MP4"
    assert not (tmp_path / "new").exists()  # validation creates nothing
    assert src.read_bytes() == b"input"


def test_animate_refuses_an_output_that_is_its_input(clip, tmp_path, capsys, monkeypatch):
    import runtime.video_io as vio
    from runtime import animate
    monkeypatch.setattr(vio, "read_video", lambda *a, **k: pytest.fail("read before the paths were checked"))
    before = clip.read_bytes()
    assert animate.main(["--driving", str(clip), "--out", str(clip)]) == cli.EXIT_ERROR
    assert "also an input" in _one_error_line(capsys.readouterr().err)
    assert clip.read_bytes() == before
    for out, msg in ((tmp_path, "is a folder"), (tmp_path / "a.avi", "unknown extension"),
                     (clip / "a.mp4", "not a folder"), (_unwritable_dir(tmp_path) / "a.mp4", "cannot be")):
        assert animate.main(["--driving", str(clip), "--out", str(out)]) == cli.EXIT_ERROR
        assert msg in _one_error_line(capsys.readouterr().err)


def test_option_ranges_are_checked_before_loading_and_name_the_flag(clip, tmp_path, capsys, monkeypatch):
    import runtime.video_io as vio
    from runtime import animate
    monkeypatch.setattr(vio, "read_video", lambda *a, **k: pytest.fail("read before the options were checked"))
    base = ["--driving", str(clip), "--out", str(tmp_path / "o.mp4")]
    for extra, flag in ((["--steps", "0"], "--steps"), (["--sampler", "lcm", "--steps", "51"], "--steps"),
                        (["--cfg", "0.5"], "--cfg"), (["--overlap", "16"], "--overlap"), (["--window", "0"], "--window"),
                        (["--gamma", "2"], "--gamma"), (["--resolution", "100"], "--resolution"),
                        (["--max-frames", "0"], "--max-frames")):
        assert animate.main(base + extra) == cli.EXIT_ERROR, extra
        assert flag in _one_error_line(capsys.readouterr().err)


def test_export_into_an_unwritable_folder_fails_first(tmp_path, capsys):
    pytest.importorskip("onnx")
    from export.__main__ import main
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, msg in ((afile / "onnx", "not a folder"), (_unwritable_dir(tmp_path) / "onnx", "cannot be")):
        assert main(["--preset", "tiny", "--out", str(out)]) == cli.EXIT_ERROR
        assert msg in _one_error_line(capsys.readouterr().err)
    assert main(["--preset", "tiny", "--out", str(tmp_path / "o"), "--steps", "0"]) == cli.EXIT_ERROR
    assert "--steps" in _one_error_line(capsys.readouterr().err)
    ctx = tmp_path / "o" / "fp16" / "context.safetensors"  # re-exporting over its own --context input
    ctx.parent.mkdir(parents=True)
    ctx.write_bytes(b"ctx")
    assert main(["--preset", "tiny", "--out", str(tmp_path / "o"), "--context", str(ctx)]) == cli.EXIT_ERROR
    assert "also an input" in _one_error_line(capsys.readouterr().err)
    assert ctx.read_bytes() == b"ctx"


def test_engine_builder_on_a_non_onnx_file(tmp_path, capsys):
    pytest.importorskip("onnx")
    from engines.__main__ import main
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    assert main(["build", str(bad)]) == cli.EXIT_ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "not a readable ONNX model" in line and "re-export" in line
    assert not (tmp_path / "model.plan").exists()


# ------------------------------------------------------------------- checkpoints, key check
def _check_keys(args: list[str], capsys) -> tuple[int, str, str]:
    from models.weights import main
    code = main(["check-keys", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_keys_on_corrupt_files_gives_one_line(tmp_path, capsys, tiny_checkpoint):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    broken = tmp_path / "keys.json"
    broken.write_text('{"keys": {"a": {"shape": [1, 2]')
    shapeless = tmp_path / "shapeless.json"
    shapeless.write_text(json.dumps({"keys": {"a": {"dtype": "float32"}}}))
    th = tmp_path / "cut.th"
    torch.save({"a": torch.zeros(1000)}, th)
    th.write_bytes(th.read_bytes()[:300])
    for path, msg in ((cut, "not a readable safetensors file"), (broken, "not a valid JSON key manifest"),
                      (shapeless, "has no valid shape"), (th, "not a readable torch checkpoint"),
                      (tmp_path / "nope.th", "does not exist")):
        code, _, err = _check_keys([str(path), "--preset", "tiny"], capsys)
        line = _one_error_line(err)
        assert code == cli.EXIT_ERROR and str(path) in line and msg in line, line


def test_check_keys_reports_nan_weights(tmp_path, capsys, tiny_checkpoint):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tiny_checkpoint))
    assert _check_keys([str(tiny_checkpoint), "--preset", "tiny"], capsys)[0] == 0
    key = "model.diffusion_model.out.2.weight"
    sd[key] = torch.full_like(sd[key], NAN)
    bad = tmp_path / "nan.safetensors"
    save_file(sd, str(bad))
    code, out, err = _check_keys([str(bad), "--preset", "tiny"], capsys)
    line = _one_error_line(err)
    assert code == cli.EXIT_ERROR and key in line and "NaN/Inf" in line and str(bad) in line and not out
    assert _check_keys([str(bad), "--preset", "tiny", "--skip-values"], capsys)[0] == 0


def test_check_keys_clip_keys_are_optional(golden_dir, capsys):
    """The golden state has no cond_stage_model.* keys: README says they are optional, so it is ok."""
    code, out, err = _check_keys([str(golden_dir / "state.safetensors"), "--preset", "tiny"], capsys)
    assert code == 0, err
    assert "ok: all" in out and "note: no CLIP" in out and "not an X-Portrait" not in out + err


def test_wrong_preset_names_the_preset_that_fits(golden_dir, capsys, tiny_checkpoint, clip, tmp_path, monkeypatch):
    code, _, err = _check_keys([str(golden_dir / "state.safetensors"), "--preset", "sd15"], capsys)
    assert code == cli.EXIT_ERROR and "pass --preset tiny" in _one_error_line(err)
    import runtime.video_io as vio
    from runtime import animate
    monkeypatch.setattr(vio, "read_video", lambda *a, **k: pytest.fail("read before the key check"))
    assert animate.main(["--checkpoint", str(tiny_checkpoint), "--preset", "sd15", "--driving", str(clip),
                         "--out", str(tmp_path / "o.mp4")]) == cli.EXIT_ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert str(tiny_checkpoint) in line and "pass --preset tiny" in line and "state dict" not in line


def test_load_xportrait_names_the_file_not_state_dict(tiny_model, tmp_path):
    from models.weights import CheckpointError, load_xportrait
    sd = {k: v for k, v in tiny_model.state_dict().items() if "zero_convs.3" not in k}
    with pytest.raises(CheckpointError) as e:
        load_xportrait(tiny_model, sd, name=str(tmp_path / "model_state-415001.th"))
    assert str(e.value).startswith(str(tmp_path / "model_state-415001.th")) and "--preset tiny" in str(e.value)


class Gadget:
    """A class a pickle could instantiate: weights_only loading refuses it."""


def test_refused_pickle_says_why_and_how_to_convert(tmp_path, capsys):
    path = tmp_path / "evil.th"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "obj": Gadget()}, path)
    code, _, err = _check_keys([str(path), "--preset", "tiny"], capsys)
    line = _one_error_line(err)
    assert code == cli.EXIT_ERROR and str(path) in line
    assert "non-tensor objects" in line and "Gadget" in line and "weights_only=True" in line
    assert "safetensors" in line and line.rstrip().endswith("file")  # a whole sentence, not cut mid-way
    assert "weights_only=False" not in line and "set to `False`" not in line and "to False" not in line


# ------------------------------------------------------------------------------ finite checks
def test_check_finite_names_the_cause():
    check_finite(torch.ones(3), "x")
    with pytest.raises(NonFiniteError) as e:
        check_finite(torch.tensor([1.0, NAN, float("inf")]), "the sampled latents")
    msg = str(e.value)
    assert "the sampled latents" in msg and "1 NaN and 1 Inf" in msg
    assert "--dtype bf16" in msg and "--dtype fp32" in msg and "checkpoint" in msg


def test_finite_monitor_reports_late_without_blocking():
    mon = FiniteMonitor("cpu", every=3)
    mon.update(torch.ones(4), "latent")
    mon.update(torch.tensor([NAN]), "frame")
    assert mon.poll() is None  # not read yet: the flag is read every 3 updates
    mon.update(torch.ones(4), "latent")
    err = mon.poll()
    assert isinstance(err, NonFiniteError) and "frame" in str(err) and "latent" not in str(err).split(";")[0]
    ok = FiniteMonitor("cpu", every=1)
    for _ in range(3):
        ok.update(torch.ones(2), "frame")
        assert ok.poll() is None
    ok.check()


@pytest.mark.gpu
def test_finite_monitor_update_does_not_sync_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: checks that update() never synchronizes the host")
    mon = FiniteMonitor("cuda", every=2)
    x, bad = torch.ones(1 << 20, device="cuda"), torch.full((8,), NAN, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in (x, bad, x, x):
            mon.update(t, "frame")
            mon.poll()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert isinstance(mon.poll(), NonFiniteError)


def test_nan_checkpoint_fails_before_sampling(tiny_checkpoint, clip, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    from runtime import animate
    sd = load_file(str(tiny_checkpoint))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key][0, 0, 0, 0] = NAN
    bad = tmp_path / "nan.safetensors"
    save_file(sd, str(bad))
    monkeypatch.setattr(animate, "animate", lambda *a, **k: pytest.fail("sampled with NaN weights"))
    out = tmp_path / "o.mp4"
    assert animate.main(["--checkpoint", str(bad), "--preset", "tiny", "--driving", str(clip), "--out", str(out),
                         "--max-frames", "1", "--steps", "1"]) == cli.EXIT_ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and key in line and "NaN/Inf" in line and not out.exists()


def test_nan_latents_fail_with_the_fp16_hint_and_write_nothing(clip, tmp_path, capsys, monkeypatch):
    from runtime import animate
    from runtime.pipeline import Result

    def nan_run(model, context, source, pose, local, config, **kw):
        n = pose.shape[0]
        return Result(torch.zeros(n, 3, 128, 128), torch.full((n, 4, 16, 16), NAN), config)
    monkeypatch.setattr(animate, "animate", nan_run)
    out = tmp_path / "o.mp4"
    assert animate.main(["--driving", str(clip), "--out", str(out), "--max-frames", "1"]) == cli.EXIT_ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert "sampled latents" in line and "--dtype bf16" in line and not out.exists()
    assert _leftovers(tmp_path) == []


# -------------------------------------------------------------------------- clean messages
def test_unreadable_driving_video_names_the_file_not_an_errno(tmp_path, capsys):
    from runtime import animate
    junk = tmp_path / "talk.mp4"
    junk.write_bytes(b"definitely not a video" * 50)
    assert animate.main(["--driving", str(junk), "--out", str(tmp_path / "o.mp4")]) == cli.EXIT_ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert str(junk) in line and "Errno" not in line and "1094995529" not in line and "re-encode" in line


def test_run_main_exit_codes_and_debug(capsys):
    def raises(exc):
        def main(argv):
            raise exc
        return main
    assert cli.run_main(lambda argv: 0, []) == cli.EXIT_OK
    assert cli.run_main(raises(FileNotFoundError("video not found: 'x.mp4'")), []) == cli.EXIT_ERROR
    assert _one_error_line(capsys.readouterr().err) == "error: video not found: 'x.mp4'"
    assert cli.run_main(raises(PermissionError(13, "Permission denied", "/out/x.mp4")), []) == cli.EXIT_ERROR
    assert "/out/x.mp4: Permission denied" in _one_error_line(capsys.readouterr().err)
    assert cli.run_main(raises(ValueError("a:\n  b\n  fix: c")), []) == cli.EXIT_ERROR
    assert _one_error_line(capsys.readouterr().err) == "error: a: b; fix: c"
    assert cli.run_main(raises(KeyboardInterrupt()), []) == cli.EXIT_SIGINT == 130
    assert "interrupted" in _one_error_line(capsys.readouterr().err)
    assert cli.run_main(raises(TypeError("oops")), []) == cli.EXIT_INTERNAL
    line = _one_error_line(capsys.readouterr().err)
    assert "internal error" in line and "TypeError" in line and "--debug" in line
    assert cli.run_main(raises(TypeError("oops")), ["--debug"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: internal error")


# ------------------------------------------------------------------ interrupted writes (signals)
WRITER = r"""
import signal, sys, time
from pathlib import Path
import numpy as np
from models.cli import run_main
from runtime.video_io import write_video

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (background jobs may inherit SIG_IGN)
out, ready = Path(sys.argv[1]), Path(sys.argv[2])

def frames():
    for i in range(100000):
        if i == 5:
            ready.write_text("writing")
        time.sleep(0.01)
        yield np.full((64, 64, 3), i % 250, np.uint8)

sys.exit(run_main(lambda argv: write_video(out, frames(), 25) and 0, []))
"""


@pytest.mark.parametrize("sig, earlier", [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_interrupted_video_write_leaves_nothing_half_written(tmp_path, sig, earlier):
    from runtime.video_io import read_video, write_video
    folder = tmp_path / "out"
    folder.mkdir()
    out, ready = folder / "anim.mp4", tmp_path / "ready"
    if earlier:
        write_video(out, [np.full((32, 32, 3), 200, np.uint8)] * 3, 10)
    before = out.read_bytes() if earlier else None
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(ready)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the writer never started"
            time.sleep(0.05)
        assert any(".tmp" in p.name for p in folder.iterdir())  # it is writing to a temp file now
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig
    assert "interrupted" in _one_error_line(err)
    assert _leftovers(folder) == []
    if earlier:
        assert out.read_bytes() == before and len(read_video(out).frames) == 3
    else:
        assert sorted(p.name for p in folder.iterdir()) == []
