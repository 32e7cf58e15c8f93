"""Model structure, presets, init, CLIP, sampler math on the tiny preset (CPU)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models.config import XPortraitConfig


def test_tiny_preset_is_the_golden_config(golden_cfg):
    tiny = XPortraitConfig.from_name("tiny")
    for f in ("unet", "vae", "schedule", "image_size"):
        assert getattr(tiny, f) == getattr(golden_cfg, f), f
    assert dataclasses.replace(tiny.motion, window=golden_cfg.motion.window) == golden_cfg.motion


def test_sd15_parameter_counts_match_the_spec():
    """Counts measured on the official classes (xportrait-spec.md §2, §8.2)."""
    from models.xportrait import XPortrait
    with torch.device("meta"):
        m = XPortrait(XPortraitConfig.from_name("sd15"), with_text_encoder=True)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(m.unet) == 1_276_658_564
    assert count(m.appearance_control_model) == 860_595_280
    assert count(m.pose_control_model) == 361_279_120
    assert count(m.first_stage_model) == 83_653_863
    assert count(m.cond_stage_model) == 123_060_480


def test_init_is_seeded_and_fp16_safe():
    """Same seed -> same weights; a deep narrow sd15-shaped UNet stays O(1) (fp16-safe)."""
    from models.init import init_random_
    from models.unet import MainUNet
    cfg = dataclasses.replace(XPortraitConfig.from_name("sd15").unet, model_channels=64, context_dim=96)
    motion = XPortraitConfig.from_name("sd15").motion
    a = init_random_(MainUNet(cfg, motion), seed=5)
    b = init_random_(MainUNet(cfg, motion), seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    peak = []
    hooks = [m.register_forward_hook(lambda m, i, o: peak.append(o.abs().max().item()))
             for m in a.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    with torch.no_grad():
        out = a(torch.randn(2, 4, 16, 16), torch.tensor([999, 999]), torch.randn(2, 77, 96))
    for h in hooks:
        h.remove()
    assert torch.isfinite(out).all() and max(peak) < 1e3 and 0.1 < out.std() < 10


def test_clip_empty_prompt_is_causal_and_loads(tiny_model):
    clip = tiny_model.cond_stage_model.transformer
    ids = clip.empty_prompt_ids(2)
    assert ids[0, 0] == 49406 and (ids[:, 1:] == 49407).all()
    ctx = clip.empty_context()
    assert ctx.shape == (1, 77, tiny_model.cfg.clip.width)
    other = ids.clone()
    other[:, 5] = 123
    with torch.no_grad():
        a, b = clip(ids), clip(other)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])


def test_uncond_ignores_reference_and_controls(tiny_model, one_thread):
    """The cond branch reads each of the reference latent, the pose hint and the local hint (each
    varied alone changes eps_cond); the uncond branch reads none of them (CFG at scale 0, i.e. the
    uncond eps alone, is bitwise the same for every conditioning)."""
    from dataclasses import replace

    from models.xportrait import Conditioning
    m = tiny_model
    T, h = 2, 16
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(T, 4, h, h, generator=g), torch.tensor([500, 500]), torch.randn(T, 77, 48, generator=g)
    pose = torch.rand(T, 3, 128, 128, generator=g) * 2 - 1
    local = -torch.ones(T, 3, 128, 128)
    local[:, :, 48:80, 48:80] = pose[:, :, 48:80, 48:80]
    base = Conditioning(torch.randn(1, 4, h, h, generator=g), pose, local)
    other_local = local.clone()
    other_local[:, :, 48:80, 48:80] = torch.rand(T, 3, 32, 32, generator=g) * 2 - 1
    variants = {"reference latent": replace(base, ref_latent=torch.randn(1, 4, h, h, generator=g)),
                "pose hint": replace(base, pose_hint=torch.rand(T, 3, 128, 128, generator=g) * 2 - 1),
                "local hint": replace(base, local_hint=other_local)}
    with torch.no_grad():
        e = m.eps_cond(x, t, ctx, base)
        u = m.eps_uncond(x, t, ctx)
        assert (e - u).abs().max() > 0.1 * u.abs().max()
        assert torch.equal(m.eps_cfg(x, t, ctx, base, 1.0), e)
        for what, c in variants.items():
            d = (m.eps_cond(x, t, ctx, c) - e).abs().max()
            assert d > 1e-3 * e.abs().max(), f"eps_cond does not depend on the {what}"
            assert torch.equal(m.eps_cfg(x, t, ctx, c, 0.0), u), f"the uncond branch reads the {what}"


def test_motion_couples_frames_only_within_a_window(tiny_model):
    x = torch.randn(4, 4, 16, 16)
    t, ctx = torch.tensor([300] * 4), torch.randn(4, 77, 48)
    with torch.no_grad():
        a = tiny_model.eps_uncond(x, t, ctx, frames=2)
        y = x.clone()
        y[3] += 1.0
        b = tiny_model.eps_uncond(y, t, ctx, frames=2)
    assert torch.equal(a[:2], b[:2]) and not torch.allclose(a[2], b[2])


@pytest.mark.parametrize("steps,first", [(2, 501), (4, 751), (30, 991)])
def test_ddim_uniform_timesteps(steps, first):
    from models.samplers import ddim_timesteps
    ts = ddim_timesteps(steps)
    assert ts[0] == first and ts[-1] == 1 and len(ts) == (31 if steps == 30 else steps)
