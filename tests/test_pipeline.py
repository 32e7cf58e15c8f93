"""The offline pipeline: the official 2-step DDIM golden run reproduced through runtime.pipeline's
Denoiser / windows / sampler code, and `python -m runtime.animate` end to end on the samples."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime import animate as cli

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def golden(golden_dir):
    from safetensors.torch import load_file

    from models.config import XPortraitConfig
    from models.weights import load_xportrait
    from models.xportrait import XPortrait
    model = XPortrait(XPortraitConfig.from_golden_json(golden_dir / "config.json")).eval()
    load_xportrait(model, golden_dir / "state.safetensors")
    return model, load_file(str(golden_dir / "io.safetensors")), json.loads((golden_dir / "config.json").read_text())


@torch.no_grad()
def test_golden_ddim_run_through_pipeline(golden):
    """T=2 frames in one window (16-frame windows, overlap 4: a 2-frame clip is one window), CFG 5."""
    from models.samplers import DDIM, initial_latent
    from runtime.pipeline import Denoiser, decode_latents, encode_source, sample, schedule
    from runtime.windows import WindowSpec
    model, io, config = golden
    assert config["sampler"]["steps"] == 2 and config["sampler"]["cfg_scale"] == 5.0
    z = encode_source(model, io["source_image"])
    x_T = initial_latent(schedule(model), z, io["ddim_noise"], "official")
    den = Denoiser(model, z, io["context"][:1], io["pose_hint"], io["local_hint"], cfg_scale=5.0)
    sampler = DDIM(schedule(model), 2)
    assert sampler.timesteps.tolist() == config["sampler"]["timesteps"]
    steps = {}

    def on_step(i, x, eps, out):
        steps.update({f"ddim_step{i}.x_in": x, f"ddim_step{i}.eps_cfg": eps, f"ddim_step{i}.x_prev": out.prev})

    final = sample(den, sampler, x_T, WindowSpec(16, 4), on_step=on_step)
    errs = {"ddim_x_T": rel_err(x_T, io["ddim_x_T"]), "ddim_final_latent": rel_err(final, io["ddim_final_latent"])}
    errs.update({k: rel_err(v, io[k]) for k, v in steps.items()})
    errs["decoded_frames"] = rel_err(decode_latents(model, final), io["decoded_frames"].clamp(-1, 1))
    print({k: f"{v:.2e}" for k, v in errs.items()})
    assert len(steps) == 6 and max(errs.values()) < 1e-4, errs


def test_reference_kv_computed_once_per_step(golden):
    from runtime.pipeline import Denoiser
    model, io, _ = golden
    den = Denoiser(model, torch.zeros(1, 4, 16, 16), io["context"][:1], io["pose_hint"], io["local_hint"])
    first = den.reference_kv(501)
    assert den.reference_kv(501) is first and den.reference_kv(1) is not first
    assert den.pose_feat.shape[0] == den.frames == 2


# ------------------------------------------------------------------- animate(): options reach the run
@pytest.fixture(scope="module")
def tiny_inputs():
    """A seeded random tiny model and its inputs: (model, context, source, pose_hint, local_hint), 2 frames."""
    from models.config import XPortraitConfig
    from models.init import init_random_
    from models.xportrait import XPortrait
    model = init_random_(XPortrait(XPortraitConfig.from_name("tiny")), seed=4).eval()
    g = torch.Generator().manual_seed(5)
    n, hw = 2, model.cfg.image_size
    source = torch.rand(1, 3, hw, hw, generator=g) * 2 - 1
    pose = torch.rand(n, 3, hw, hw, generator=g) * 2 - 1
    local = -torch.ones(n, 3, hw, hw)
    local[:, :, 40:60, 40:60] = pose[:, :, 40:60, 40:60]
    return model, torch.randn(1, 77, model.cfg.unet.context_dim, generator=g), source, pose, local


def _no_decode(monkeypatch):
    """These tests look at latents; the decoder is covered by the golden tests."""
    from runtime import pipeline
    monkeypatch.setattr(pipeline, "decode_latents", lambda model, latents, *a, **k: torch.zeros(latents.shape[0], 3, 1, 1))


def test_animate_honours_init(tiny_inputs, monkeypatch, one_thread):
    """--init official: x_T is the source latent noised to t=999 with the very noise that --init noise
    starts from (same seed); --init noise: that noise alone."""
    from models.schedule import q_sample
    from runtime import pipeline
    x_T = {}

    def fake_sample(denoiser, sampler, x, *args, **kwargs):  # record x_T, skip the denoising
        x_T[mode] = x.clone()
        return x
    monkeypatch.setattr(pipeline, "sample", fake_sample)
    _no_decode(monkeypatch)
    model, ctx, source, pose, local = tiny_inputs
    for mode in ("official", "noise"):
        pipeline.animate(model, ctx, source, pose, local, pipeline.SamplingConfig(init=mode, steps=1, seed=3))
    z = pipeline.encode_source(model, source)
    want = q_sample(pipeline.schedule(model), z.expand(2, -1, -1, -1), 999, x_T["noise"])
    assert (x_T["noise"].std() - 1).abs() < 0.1
    assert (x_T["official"] - want).abs().max() < 1e-5
    assert (x_T["official"] - x_T["noise"]).abs().max() > 0.1


def test_animate_applies_cfg_scale(tiny_inputs, monkeypatch, one_thread):
    """The uncond branch runs once per window and step exactly when CFG is on, and the scale is the
    CFG weight: one LCM step is affine in eps, so latents(s) - latents(1) is proportional to s - 1."""
    from runtime import pipeline
    model, ctx, source, pose, local = tiny_inputs
    calls = []
    eps_uncond = model.eps_uncond
    monkeypatch.setattr(model, "eps_uncond", lambda *a, **k: calls.append(1) or eps_uncond(*a, **k))
    _no_decode(monkeypatch)
    lat, uncond = {}, {}
    for s in (1.0, 2.0, 4.0):
        calls.clear()
        r = pipeline.animate(model, ctx, source, pose, local, pipeline.SamplingConfig("lcm", steps=1, cfg_scale=s))
        assert r.config.cfg_scale == s
        lat[s], uncond[s] = r.latents, len(calls)
    assert uncond == {1.0: 0, 2.0: 1, 4.0: 1}
    d2, d4 = lat[2.0] - lat[1.0], lat[4.0] - lat[1.0]
    assert d2.abs().max() > 1e-2 * lat[1.0].abs().max(), "CFG 2 gave the CFG 1 result"
    assert (d4 - 3 * d2).abs().max() < 1e-3 * d4.abs().max()


def test_animate_random_offsets_reach_the_windows(tiny_inputs, monkeypatch, one_thread):
    """--random-offsets: each step's windows start at the offset random.Random(seed).randint(0, N-1)
    draws for that step (spec §5.2), seeded by the run's seed; fixed offsets start at 0."""
    import random

    from runtime import pipeline
    from runtime.windows import WindowSpec, plan
    model, ctx, source, _, _ = tiny_inputs
    n, steps, seed = 5, 3, 11
    g = torch.Generator().manual_seed(6)
    pose = torch.rand(n, 3, 128, 128, generator=g) * 2 - 1
    seen: list[tuple[int, list[int]]] = []

    def fake_call(self, x, t, idx):  # record the window, skip the model
        seen.append((t, idx.tolist()))
        return torch.zeros_like(x, dtype=torch.float32)
    monkeypatch.setattr(pipeline.Denoiser, "__call__", fake_call)
    _no_decode(monkeypatch)
    rng = random.Random(seed)
    offsets = [rng.randint(0, n - 1) for _ in range(steps)]
    assert len(set(offsets)) > 1  # this seed moves the seams between steps
    for mode, offs in (("random", offsets), ("fixed", [0] * steps)):
        seen.clear()
        cfg = pipeline.SamplingConfig("lcm", steps=steps, cfg_scale=1.0, seed=seed,
                                      window=WindowSpec(size=2, overlap=1, offsets=mode, seed=0))
        pipeline.animate(model, ctx, source, pose, -torch.ones_like(pose), cfg)
        ts = list(dict.fromkeys(t for t, _ in seen))
        got = [[idx for t, idx in seen if t == ti] for ti in ts]
        assert got == [[w.tolist() for w in plan(n, 2, 1, o)] for o in offs], mode


def test_animate_honours_step_and_shared_noise(tiny_inputs, monkeypatch, one_thread):
    """--step-noise fixed re-noises with one tensor at every step (fresh: a new draw per step);
    --shared-noise gives every frame the same x_T and step noise."""
    from runtime import pipeline
    model, ctx, source, pose, local = tiny_inputs
    seen = {}

    def fake_run(sampler, x, eps_fn, on_step=None, noise_fn=None):  # record the noises, skip the model
        seen[key] = (x.clone(), [noise_fn(i) for i in range(len(sampler))])
        return x
    monkeypatch.setattr(pipeline, "run_sampler", fake_run)
    _no_decode(monkeypatch)
    for key in (("fixed", False), ("fresh", True)):
        cfg = pipeline.SamplingConfig("lcm", steps=3, init="noise", step_noise=key[0], shared_noise=key[1])
        pipeline.animate(model, ctx, source, pose, local, cfg)
    x_T, (n0, n1, n2) = seen[("fixed", False)]
    assert torch.equal(n0, n1) and n2 is None and not torch.equal(x_T[0], x_T[1]) and not torch.equal(n0[0], n0[1])
    x_T, (n0, n1, n2) = seen[("fresh", True)]
    assert not torch.equal(n0, n1) and n2 is None
    assert torch.equal(x_T[0], x_T[1]) and torch.equal(n0[0], n0[1]) and torch.equal(n1[0], n1[1])


def test_denoiser_gives_each_window_its_frames_hints(tiny_inputs, monkeypatch, one_thread):
    """A window of frames idx gets the hint features of exactly those frames, in window order."""
    from runtime.pipeline import Denoiser
    model, ctx, source, _, _ = tiny_inputs
    g = torch.Generator().manual_seed(8)
    pose, local = (torch.rand(4, 3, 128, 128, generator=g) * 2 - 1 for _ in range(2))
    den = Denoiser(model, torch.zeros(1, 4, 16, 16), ctx, pose, local, cfg_scale=1.0)
    seen = {}
    monkeypatch.setattr(den, "reference_kv", lambda t: [])
    monkeypatch.setattr(model, "eps_from_cache", lambda x, t, c, kv, pf, lf, **k: seen.update(pf=pf, lf=lf) or 0 * x)
    idx = torch.tensor([3, 1])
    den(torch.zeros(2, 4, 16, 16), 501, idx)
    with torch.no_grad():
        want = model.hint_features(pose[idx], local[idx])
    assert torch.allclose(seen["pf"], want[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(seen["lf"], want[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    """The first 4 sample frames at an unusual rate (12.5 fps): count and fps must survive."""
    from runtime.video_io import read_video, write_video
    if not (SAMPLES / "driving.mp4").is_file():
        pytest.skip("samples/driving.mp4 missing (python -m scripts.make_samples)")
    path = tmp_path_factory.mktemp("clip") / "short.mp4"
    write_video(path, read_video(SAMPLES / "driving.mp4").frames[:4], 12.5)
    return path


def test_animate_cli_keeps_frame_count_and_fps(short_clip, tmp_path):
    from runtime.video_io import read_video
    out = tmp_path / "anim.mp4"
    summary = cli.run(cli.parse_args(["--driving", str(short_clip), "--out", str(out), "--steps", "1"]),
                      log=lambda *_: None)
    anim, preview = read_video(out), read_video(tmp_path / "anim_preview.mp4")
    assert summary["frames"] == len(anim.frames) == len(preview.frames) == 4
    assert abs(anim.fps - 12.5) < 1e-3 and abs(preview.fps - 12.5) < 1e-3
    assert anim.frames.shape[1:] == (128, 128, 3) and preview.frames.shape[1:] == (128, 384, 3)
    # random weights: a caption is burned in, white text on the frame darkened to 30% (the decoder's
    # random output alone reaches 255 too, so the text is checked against the caption's own mask)
    frames = anim.frames.astype(np.float64)
    mask = cli._caption(np.zeros((1, *frames.shape[1:]), np.uint8), cli.SHORT_CAPTION)[0, :, :, 0]
    r0 = int(np.nonzero(mask.max(1))[0].min())
    band, text = frames[:, r0:], mask[r0:]
    assert band[:, text == 0].mean() < 0.5 * frames[:, :r0 - 8].mean()
    assert band[:, text > 200].mean() > 180


def test_animate_cli_errors_are_one_line(tmp_path, capsys):
    from runtime.video_io import write_image, write_video
    assert cli.main(["--source", str(tmp_path / "nope.png")]) == 1  # models/cli.py: 1 = bad input
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.png" in err and err.count("\n") == 1
    blank, flat = tmp_path / "blank.png", tmp_path / "flat.mp4"
    write_image(blank, np.full((128, 128, 3), 127, np.uint8))
    write_video(flat, [np.full((64, 64, 3), 90, np.uint8)] * 2, 10)
    assert cli.main(["--source", str(blank), "--driving", str(flat)]) == 1
    err = capsys.readouterr().err
    assert "no face" in err and err.count("\n") == 1
    assert cli.main(["--resolution", "100"]) == 1
    assert "multiple of 64" in capsys.readouterr().err


def test_animate_cli_rejects_wrong_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file
    if not (SAMPLES / "driving.mp4").is_file():
        pytest.skip("samples/driving.mp4 missing")
    bad = tmp_path / "sd_like.safetensors"
    save_file({"model.diffusion_model.foo.weight": torch.zeros(2)}, str(bad))
    assert cli.main(["--checkpoint", str(bad), "--preset", "tiny", "--max-frames", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not match the model" in err and err.count("\n") == 1


def test_load_models_from_checkpoint_fills_every_tensor(tmp_path):
    """The checkpoint path builds on the meta device, checks keys, then loads strictly: every
    tensor (incl. schedule buffers and CLIP) must equal the file's."""
    from safetensors.torch import save_file

    from models.config import XPortraitConfig
    from models.init import init_random_
    from models.xportrait import XPortrait
    from runtime.pipeline import load_models
    ref = init_random_(XPortrait(XPortraitConfig.from_name("tiny"), with_text_encoder=True), 3).eval()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    got = load_models("tiny", checkpoint=path)
    assert not got.random_weights
    sd = ref.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in got.model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(got.context, ref.cond_stage_model.transformer.empty_context())
