"""The live runtime on the rgbd (joint RGB + depth) variant: tiny-rgbd, CPU (runtime/live/depth.py).

* the session streams RGB + depth frames, decoded as models.depth.decode_rgbd decodes the final latent
  (batched, and one decoder call per group for static batch-1 exports);
* docs/rgbd.md's zero-init promise holds per step on the live path: a zero-initialised conversion of
  the RGB model gives the RGB session's frames in its RGB group (the rgb group of every fixed noise is
  the RGB session's; drawn naively it is not, and the frames differ), in both schedules;
* the device-side view: [RGB or relit RGB | depth gray], the light buffer moved in place, the
  pipeline carrying both panels in one download and applying light changes between frames;
* the light keys (arrows, i/j/k/l) through the pygame window and LightKeys;
* `python -m runtime.webcam --depth --relight --output` writes a video twice as wide with a
  "relight" stage in the latency log; --relight without --depth and an RGB checkpoint are one-line errors.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models import rgbd
from models.config import XPortraitConfig
from models.depth import decode_rgbd, to_display
from runtime.live.config import LiveConfig
from runtime.live.depth import DepthView, LatentLayout, LightKeys
from runtime.live.session import LiveSession, Output

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
MODS = ("rgb", "depth")
FRAMES = 4


@pytest.fixture(scope="module")
def pair():
    """The tiny RGB model (seeded random weights) and its zero-initialised rgbd conversion, as live graphs."""
    from models.schedule import ddpm_buffers
    from models.weights import load_xportrait
    from models.xportrait import XPortrait
    from runtime.live.factory import ring_layout
    from runtime.live.graphs import torch_graphs
    from runtime.pipeline import load_models
    rgb = load_models("tiny", need_taesd=True, seed=0)
    wide = XPortrait(XPortraitConfig.from_name("tiny-rgbd")).eval()
    load_xportrait(wide, rgbd.widen_state_dict(rgb.model.state_dict(), MODS, "zero"))  # strict
    cfg = LiveConfig.from_name("tiny", steps=2, window=3)  # LCM, 2 steps: fixed noise between the steps
    alphas = ddpm_buffers(rgb.model.cfg.schedule)["alphas_cumprod"].float()
    size = cfg.image_size()

    def session(model, preset, **over):
        c = replace(cfg, preset=preset, **over)
        graphs = torch_graphs(model, rgb.taesd, c.encoder, c.decoder, torch.float32)
        return LiveSession(graphs, c, rgb.context.float(), alphas, ring_layout(preset, size),
                           modalities=model.cfg.unet.modalities)
    return {"rgb": lambda **o: session(rgb.model, "tiny", **o), "rgbd": lambda **o: session(wide, "tiny-rgbd", **o),
            "taesd": rgb.taesd, "size": size, "state_dict": rgb.model.state_dict()}


def _frames(n: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (size, size, 3), generator=g).float()
    out = []
    for k in range(n):
        pose = (base.roll(3 * k, dims=1) * 0.9 + 8 * k).clamp(0, 255).to(torch.uint8)
        out.append((pose, pose.flip(0)))
    return out


def _source(size: int) -> torch.Tensor:
    return torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def _run(session, frames) -> list[Output]:
    session.set_source(_source(session.size))
    outs = [session.step(p, q, tag=k) for k, (p, q) in enumerate(frames)]
    return [o for o in outs if o is not None]


def _u8(x: torch.Tensor) -> np.ndarray:
    return x.numpy().astype(int)


# ------------------------------------------------------------------------------ the session
def test_rgbd_session_streams_rgb_and_depth(pair):
    s = pair["rgbd"]()
    R = s.size
    assert s.x.shape[1] == s.x_T.shape[1] == s.noise.shape[1] == 8  # 4 channels per modality
    outs = []
    for k, (p, q) in enumerate(_frames(3, R)):
        if k == 0:
            s.set_source(_source(R))
        o = s.step(p, q, tag=k)
        assert o.image.shape == (R, R, 3) and o.image.dtype == torch.uint8
        assert o.depth.shape == (R, R) and o.depth.dtype == torch.float32
        assert torch.isfinite(o.depth).all() and o.depth.abs().max() <= 1
        # the session decodes exactly what decode_rgbd makes of its final latent (sequential: x[0])
        with torch.no_grad():
            want_rgb, want_depth = decode_rgbd(pair["taesd"], s.x[:1], MODS)
        torch.testing.assert_close(o.depth, want_depth[0, 0], rtol=0, atol=1e-5)
        want_u8 = ((want_rgb[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0)
        assert np.abs(_u8(o.image) - want_u8.numpy()).max() <= 1
        outs.append(o)
    assert not torch.equal(outs[0].depth, outs[-1].depth), "depth must follow the frames"
    # static batch-1 exports: one decoder call per group gives the same frames
    per_group = LatentLayout(MODS, 4, s.t, s.x.shape[2:], s.graphs.input_dtypes, max_batch=1)
    assert not per_group.batched_decode and s.latent.batched_decode
    (a, da), (b, db) = s.latent.decode(s.graphs["decoder"], s.x[:1]), per_group.decode(s.graphs["decoder"], s.x[:1])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # batch 2 vs 1: float rounding only
    torch.testing.assert_close(da, db, rtol=1e-5, atol=1e-5)


def test_live_modes_other_than_joint_are_refused():
    with pytest.raises(ValueError, match="runtime.animate --depth --depth-mode"):
        LatentLayout(MODS, 4, torch.zeros(2), (16, 16), {}, mode="image-to-depth")


def test_zero_converted_rgbd_gives_the_rgb_frames(pair):
    """docs/rgbd.md: zero init, one timestep for all modalities -> every eps group = the RGB eps, for any
    depth latent. Live joint mode feeds t (B, 2) with equal entries and the rgb group of every fixed
    noise is the RGB session's, so the RGB group follows the RGB trajectory step for step."""
    frames = _frames(FRAMES, pair["size"])
    s_rgb, s_wide = pair["rgb"](), pair["rgbd"]()
    a, b = _run(s_rgb, frames), _run(s_wide, frames)
    assert len(a) == len(b) == FRAMES
    lat_rgbd, lat_rgb = rgbd.group(s_wide.x[:1], MODS, "rgb"), s_rgb.x[:1]
    torch.testing.assert_close(lat_rgbd, lat_rgb, rtol=1e-4, atol=1e-4)
    diffs = [int(np.abs(_u8(x.image) - _u8(y.image)).max()) for x, y in zip(a, b)]
    print(f"zero-init rgbd vs rgb: last latent max rel diff "
          f"{float((lat_rgbd - lat_rgb).abs().max() / lat_rgb.abs().max()):.1e}, max |uint8 diff| per frame {diffs}")
    assert max(diffs) <= 1
    assert not all(np.array_equal(_u8(a[0].image), _u8(x.image)) for x in a[1:]), "frames should differ"
    # the stream batch gives the same RGB and depth frames, S-1 calls later
    batched = _run(pair["rgbd"](stream_batch=True), frames)
    assert [o.tag for o in batched] == list(range(FRAMES - 1))
    for x, y in zip(b, batched):
        assert np.abs(_u8(x.image) - _u8(y.image)).max() <= 1
        torch.testing.assert_close(x.depth, y.depth, rtol=0, atol=1e-4)


def test_naive_noise_layout_breaks_the_promise(pair, monkeypatch):
    """Control: drawing the 8-channel noise in one piece shifts the RGB group's per-step noise, and the
    frames then differ from the RGB model's (the test above can fail)."""
    import runtime.live.session as session_mod

    def naive(g, modalities, channels, steps, h, w):
        c = channels * len(modalities)
        return torch.randn(1, c, h, w, generator=g), torch.randn(steps, c, h, w, generator=g)
    frames = _frames(2, pair["size"])
    want = _run(pair["rgb"](), frames)
    monkeypatch.setattr(session_mod, "layout_noise", naive)
    got = _run(pair["rgbd"](), frames)
    assert max(np.abs(_u8(x.image) - _u8(y.image)).max() for x, y in zip(want, got)) > 8


# --------------------------------------------------------------------------- view and light
def _sphere(size: int) -> torch.Tensor:
    """Normalized depth of a sphere of radius 0.7 in front of a far background (near -1)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    z = (0.49 - x ** 2 - y ** 2).clamp(min=0).sqrt()
    return torch.where(z > 0, 0.2 - z, torch.ones_like(z))


class _Clock:
    def __init__(self):
        self.marks = []

    def mark(self, name):
        self.marks.append(name)


def test_depth_view_composes_and_relights_on_the_device():
    R = 64
    image = torch.full((R, R, 3), 150, dtype=torch.uint8)
    depth = _sphere(R)
    gray = (to_display(depth) * 255).round().to(torch.uint8)
    plain = DepthView("cpu")(image, depth)
    assert plain.shape == (R, 2 * R, 3) and plain.dtype == torch.uint8
    assert torch.equal(plain[:, :R], image)
    assert all(torch.equal(plain[:, R:, c], gray) for c in range(3)), "depth panel: gray, near = white"
    assert gray[R // 2, R // 2] == 191 and gray[0, 0] == 0  # centre n = -0.5 -> (1 + 0.5) / 2; far -> 0

    keys = LightKeys(azimuth=-60, elevation=0)
    view = DepthView("cpu", relight_on=True, light=keys.direction())
    buf = view.light.data_ptr()
    clock = _Clock()
    lit = view(image, depth, clock).int()
    assert clock.marks == ["relight"]
    row = lit[R // 2, :R, 0]
    left, right = row[R // 2 - 15], row[R // 2 + 15]
    assert left > right + 20, f"light from the left: left side {left} should be brighter than right {right}"
    assert torch.equal(lit[:4, :4], image[:4, :4].int()), "background (far) is left as is"
    assert torch.equal(lit[:, R:], plain[:, R:].int())
    keys.apply(["light_right"] * 8)
    view.set_light(keys.direction())
    assert view.light.data_ptr() == buf, "the light buffer is written in place"
    moved = view(image, depth).int()[R // 2, :R, 0]
    assert moved[R // 2 + 15] > moved[R // 2 - 15] + 20, "the light moved to the right"
    with pytest.raises(ValueError, match="--depth"):
        view(image, None)


def test_light_keys_move_the_light():
    k = LightKeys(azimuth=0, elevation=0, step=15, limit=80)
    assert not k.apply(["reset", "toggle_hud"])
    assert k.apply(["light_left"]) and (k.azimuth, k.elevation) == (-15, 0)
    assert k.direction()[0] < 0, "azimuth < 0: the light is on the viewer's left"
    assert k.apply(["light_up", "light_up"]) and k.elevation == 30 and k.direction()[1] > 0
    k.apply(["light_down"] * 20 + ["light_right"] * 20)
    assert (k.azimuth, k.elevation) == (80, -80), "clamped to the limit"
    assert not k.apply(["light_right"]), "at the limit nothing moves"
    torch.testing.assert_close(k.direction().norm(), torch.tensor(1.0))
    assert "az +80 el -80" in k.describe()


def test_window_maps_arrows_and_ijkl_to_light_actions(monkeypatch):
    try:
        import pygame
    except ImportError:
        pytest.skip("pygame is not installed: pip install pygame==2.6.1 (the window's toolkit, app extra)")
    from runtime.live.present import KEYS, Window
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # a real window without a display server
    w = Window(panel=32)
    try:
        pressed = [pygame.K_LEFT, pygame.K_j, pygame.K_RIGHT, pygame.K_l, pygame.K_UP, pygame.K_i, pygame.K_DOWN,
                   pygame.K_k, pygame.K_s]
        for key in pressed:
            pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=key))
        assert w.poll() == ["light_left", "light_left", "light_right", "light_right", "light_up", "light_up",
                            "light_down", "light_down", "swap_source"]
    finally:
        w.close()
    assert {KEYS[k] for k in ("LEFT", "RIGHT", "UP", "DOWN")} == {"light_left", "light_right", "light_up",
                                                                  "light_down"}


def test_window_keeps_the_aspect_of_a_wide_frame():
    from runtime.live.present import OutputFrame, compose
    wide = np.zeros((64, 128, 3), np.uint8)
    view = compose(OutputFrame(wide, 0.0, 0, np.zeros((64, 64, 3), np.uint8)), panel=96)
    assert view.shape == (96, 96 + 192, 3)


class _DepthSession:
    """Stands in for an rgbd LiveSession: echoes the pose as RGB, with a sphere depth."""

    def __init__(self, size: int):
        self.device, self.size, self.steps = torch.device("cpu"), size, 1
        self.depth = _sphere(size)

    def step(self, pose, local, tag=None, clock=None):
        return Output(pose.clone(), tag, self.depth)

    def set_source(self, image):
        pass

    def reset(self):
        pass


def test_pipeline_downloads_both_panels_and_applies_light_changes():
    from runtime.live.capture import PushSource
    from runtime.live.pipeline import Pipeline
    R = 64

    class Hints:
        def __init__(self, rgb):
            self.pose, self.local, self.face = rgb, np.zeros_like(rgb), True

    src = PushSource(fps=30)
    view = DepthView("cpu", relight_on=True, light=LightKeys(-60, 0).direction())
    pipe = Pipeline(_DepthSession(R), src, lambda rgb, t: Hints(rgb), every_frame=True, view=view).start()
    frame = np.full((R, R, 3), 150, np.uint8)
    results = pipe.results(timeout=5)
    try:
        src.push(frame)
        first = next(r for r in results if r is not None)
        pipe.set_light(LightKeys(60, 0).direction())
        src.push(frame)
        second = next(r for r in results if r is not None)
    finally:
        src.close()
        pipe.join()
    assert first.image.shape == second.image.shape == (R, 2 * R, 3)
    assert "relight" in first.stages
    assert np.array_equal(first.image[:, R:], second.image[:, R:]), "same depth panel"
    a, b = first.image[R // 2, :R, 0].astype(int), second.image[R // 2, :R, 0].astype(int)
    assert a[R // 2 - 15] > a[R // 2 + 15] + 20 and b[R // 2 + 15] > b[R // 2 - 15] + 20, "the light moved"


# ---------------------------------------------------------------------------------- the CLI
def _webcam(*args, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "runtime.webcam", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_webcam_depth_headless_writes_rgb_and_depth(tmp_path):
    out, log = tmp_path / "out.mp4", tmp_path / "lat.jsonl"
    r = _webcam("--input", "samples/driving.mp4", "--output", str(out), "--headless", "--every-frame",
                "--frames", "3", "--steps", "1", "--window", "3", "--depth", "--relight", "--log-json", str(log))
    assert r.returncode == 0, r.stderr
    assert "tiny-rgbd" in r.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 3 and all("relight" in row["stages"] for row in rows)
    assert "relight" in r.stderr  # in the summary table
    from runtime.video_io import read_video
    video = np.asarray(read_video(out).frames)
    assert video.shape[0] == 3 and video.shape[2] == 2 * video.shape[1] == 256, video.shape
    depth_panel = video[:, 8:-8, 128 + 8:-8].astype(int)  # away from the seam (yuv420p chroma)
    assert np.abs(depth_panel - depth_panel.mean(-1, keepdims=True)).max() <= 6, "the depth panel is gray"


def test_webcam_depth_errors_name_the_fix(pair, tmp_path, capsys):
    from safetensors.torch import save_file

    from runtime.webcam import main
    assert main(["--relight", "--headless"]) == 1
    assert "--relight needs --depth" in capsys.readouterr().err
    rgb_file = tmp_path / "rgb.safetensors"  # an RGB X-Portrait checkpoint (tiny): not converted
    save_file({k: v.contiguous() for k, v in pair["state_dict"].items()}, str(rgb_file))
    code = main(["--depth", "--checkpoint", str(rgb_file), "--headless", "--input", "samples/driving.mp4",
                 "--frames", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "python -m models.rgbd convert" in err and "Traceback" not in err, err
