"""The joint RGB-D variant (models/rgbd.py, models/depth.py, runtime/relight.py) on the tiny preset.

- layout: presets, key names and the three widened shapes;
- checkpoint conversion: each documented initialization reproduces the RGB model's eps (float64, CFG on)
  in exactly the case it promises, and not outside it; strict loading and the conversion CLI;
- depth: the normalization's own invertibility, and the codec round trip through TAESD's *structure*
  with analytic weights (random weights reconstruct nothing; real weights: `python -m models.depth`);
- modes: per-call composition, and the offline pipeline switching modes on one model;
- relighting: normals and shading of an analytic sphere against its known normals;
- ONNX Runtime parity of the widened streaming UNet (fp32 and fp16), with the layout in the manifest.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import XPortraitConfig
from models.depth import (DepthRange, decode_depth, decode_rgbd, encode_depth, from_display, portrait_depth,
                          to_display)
from models.rgbd import (CONV_IN, CONV_OUT, RGBDMode, check_layout, compose, eps_from_cache, finish, group,
                         widen_state_dict)
from models.weights import CheckpointError, load_xportrait
from models.xportrait import XPortrait

MODS = ("rgb", "depth")
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("base", ["tiny", "sd15"])
def test_presets_keys_and_widened_shapes(base):
    with torch.device("meta"):
        rgb = XPortrait(XPortraitConfig.from_name(base)).state_dict()
        wide = XPortrait(XPortraitConfig.from_name(f"{base}-rgbd")).state_dict()
    assert list(rgb) == list(wide)  # same keys, same order: one checkpoint format
    changed = {k: (tuple(rgb[k].shape), tuple(wide[k].shape)) for k in rgb if rgb[k].shape != wide[k].shape}
    mc = XPortraitConfig.from_name(base).unet.model_channels
    assert changed == {CONV_IN: ((mc, 4, 3, 3), (mc, 8, 3, 3)), CONV_OUT[0]: ((4, mc, 3, 3), (8, mc, 3, 3)),
                       CONV_OUT[1]: ((4,), (8,))}
    for net in ("appearance_control_model", "pose_control_model", "local_pose_control_model"):
        assert wide[f"{net}.input_blocks.0.0.weight"].shape[1] == 4  # reference net, ControlNets: RGB only


def test_layout_helpers():
    x = torch.arange(2 * 8 * 2 * 2, dtype=torch.float32).reshape(2, 8, 2, 2)
    assert torch.equal(group(x, MODS, "rgb"), x[:, :4]) and torch.equal(group(x, MODS, "depth"), x[:, 4:])
    assert torch.equal(group(x, ("depth", "rgb"), "rgb"), x[:, 4:])  # the order is the layout
    with pytest.raises(ValueError, match="no 'depth' group"):
        group(x[:, :4], ("rgb",), "depth")
    with pytest.raises(ValueError, match="need 'rgb' once"):
        from models.config import UNetConfig
        UNetConfig(modalities=("depth", "depth"))


# ------------------------------------------------------------------------ checkpoint conversion
@pytest.fixture(scope="module")
def rgb_model():
    from models.init import init_random_
    return init_random_(XPortrait(XPortraitConfig.from_name("tiny")), seed=3).eval().double()


@pytest.fixture(scope="module")
def cond(rgb_model):
    """Two frames of conditioning, the RGB model's eps (CFG 3: both branches) and its inputs."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, t = rnd(2, 4, 16, 16), torch.tensor([500, 500])
    ctx, ref = rnd(1, 77, 48).expand(2, -1, -1), rnd(1, 4, 16, 16)
    hint = torch.rand(2, 3, 128, 128, generator=g, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        kv = rgb_model.reference_kv(ref, t, ctx)
        feats = rgb_model.hint_features(hint, hint.flip(0))
        eps = rgb_model.eps_from_cache(x, t, ctx, kv, *feats, scale=3.0)
    return dict(x=x, t=t, ctx=ctx, kv=kv, feats=feats, eps=eps, depth=rnd(2, 4, 16, 16))


def _wide_eps(model, c, depth, t_mod):
    with torch.no_grad():
        return eps_from_cache(model, torch.cat([c["x"], depth], 1), t_mod, c["ctx"], c["kv"], *c["feats"], scale=3.0)


@pytest.mark.parametrize("init", ["zero", "marigold"])
def test_conversion_reproduces_rgb_prediction(rgb_model, cond, init):
    """zero: every eps group = the RGB eps for ANY depth latent; marigold: when depth latent = RGB latent.
    Both need one timestep for all modalities. Outside its promise each init differs."""
    wide = XPortrait(XPortraitConfig.from_name("tiny-rgbd")).eval().double()
    load_xportrait(wide, widen_state_dict(rgb_model.state_dict(), MODS, init))  # strict
    c, same_t = cond, torch.stack([cond["t"], cond["t"]], 1)
    promised = c["depth"] if init == "zero" else c["x"]
    eps = _wide_eps(wide, c, promised, same_t)
    scale = c["eps"].abs().max()
    for m in MODS:
        err = (group(eps, MODS, m) - c["eps"]).abs().max() / scale
        print(f"{init} {m}: max rel err {err:.1e}")
        assert err <= 1e-12
    outside = _wide_eps(wide, c, c["depth"], same_t) if init == "marigold" else \
        _wide_eps(wide, c, promised, torch.stack([c["t"], 0 * c["t"]], 1))  # per-modality t differ
    assert (group(outside, MODS, "rgb") - c["eps"]).abs().max() / scale > 1e-3


def test_strict_loading_and_conversion_cli(rgb_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from models.rgbd import main
    sd = {k: v.float().contiguous() for k, v in rgb_model.state_dict().items()}
    cfg = XPortraitConfig.from_name("tiny-rgbd")
    with torch.device("meta"):
        wide, rgb = XPortrait(cfg), XPortrait(XPortraitConfig.from_name("tiny"))
    with pytest.raises(CheckpointError, match="python -m models.rgbd convert"):
        check_layout(sd, cfg)
    with pytest.raises(CheckpointError, match="mis-shaped|shape mismatch"):
        load_xportrait(wide, sd)
    with pytest.raises(CheckpointError, match="mis-shaped|shape mismatch"):
        load_xportrait(rgb, widen_state_dict(sd))
    save_file(sd, str(tmp_path / "rgb.safetensors"))
    assert main(["convert", str(tmp_path / "rgb.safetensors"), str(tmp_path / "rgbd.safetensors"),
                 "--preset", "tiny-rgbd", "--init", "marigold"]) == 0
    out = load_file(str(tmp_path / "rgbd.safetensors"))
    want = widen_state_dict(sd, MODS, "marigold")
    assert out.keys() == want.keys() and all(torch.equal(out[k], want[k]) for k in want)
    check_layout(out, cfg)
    assert not list(tmp_path.glob("*.tmp"))  # written to a temp file, then renamed
    assert main(["convert", str(tmp_path / "rgbd.safetensors"), str(tmp_path / "x.safetensors"),
                 "--preset", "tiny-rgbd"]) == 1  # already widened: refused, with the reason
    assert main(["convert", str(tmp_path / "rgb.safetensors"), str(tmp_path / "rgb.safetensors"),
                 "--preset", "tiny-rgbd"]) == 1  # never overwrites its input


# ------------------------------------------------------------------------------------- depth
def test_depth_normalization_is_invertible():
    d = portrait_depth(64).double()
    r = DepthRange.fit(d, quantile=0.0)
    n = r.normalize(d)
    assert n.min() == -1 and n.max() == 1
    err64 = (r.denormalize(n) - d).abs().max().item()
    d32 = d.float()
    err32 = ((r.denormalize(r.normalize(d32)) - d32).abs().max() / d32.abs().max()).item()
    print(f"normalization round trip: float64 {err64:.1e}, float32 rel {err32:.1e}")
    assert err64 < 1e-12 and err32 < 1e-6
    r2 = DepthRange.fit(d, quantile=0.02)  # affine-invariant (Marigold): clips only the outer 2 %
    inside = (d >= r2.near) & (d <= r2.far)
    assert inside.float().mean() > 0.9
    assert (r2.denormalize(r2.normalize(d)) - d)[inside].abs().max() < 1e-12
    bad = torch.tensor([float("nan"), float("inf"), 0.0, -1.0])
    assert torch.equal(r.normalize(bad), torch.ones(4, dtype=bad.dtype))  # invalid depth -> far
    assert torch.allclose(from_display(to_display(n)), n, atol=1e-12)
    with pytest.raises(ValueError, match="far > near"):
        DepthRange(2.0, 1.0)
    with pytest.raises(ValueError, match="constant"):
        DepthRange.fit(torch.ones(10))


def analytic_taesd(s: float):
    """TAESD's exact structure with weights that make it an 8x8 box filter and its inverse:
    latent (all 4 channels) = s * mean over an 8x8 block of the channel mean; decode = nearest upsampling.
    ReLUs are identities on the non-negative signals, residual blocks are zeroed (Block = ReLU)."""
    from models.taesd import TAESD
    t = TAESD(XPortraitConfig.from_name("tiny").taesd).eval()
    for p in t.parameters():
        torch.nn.init.zeros_(p)
    enc = [m for m in t.encoder if isinstance(m, torch.nn.Conv2d)]
    dec = [m for m in t.decoder if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        enc[0].weight[0, :, 1, 1] = 1 / 3
        for conv in enc[1:-1]:  # the three stride-2 convs
            conv.weight[0, 0, 1:3, 1:3] = 0.25
        enc[-1].weight[:, 0, 1, 1] = s
        dec[0].weight[0, 0, 1, 1] = 1 / s
        for conv in dec[1:-1]:  # after each 2x nearest upsampling
            conv.weight[0, 0, 1, 1] = 1.0
        dec[-1].weight[:, 0, 1, 1] = 1.0
    return t


def test_depth_round_trip_through_taesd_structure():
    """Block-constant depth survives encode -> decode except for TAESD's tanh latent clamp, whose error
    is known in closed form: the decoder sees 3 tanh(z / 3) instead of z."""
    s = 0.05
    taesd = analytic_taesd(s)
    blocks = DepthRange.fit(portrait_depth(16), 0.0).normalize(portrait_depth(16))
    n = blocks.repeat_interleave(8, -2).repeat_interleave(8, -1)  # (1, 1, 128, 128), constant on 8x8 blocks
    with torch.no_grad():
        z = encode_depth(taesd, n)
        back = decode_depth(taesd, z)
    assert z.shape == (1, 4, 16, 16) and back.shape == n.shape
    x01 = (n + 1) / 2
    closed = 2 * (3 * torch.tanh(s * x01 / 3) / s) - 1
    err = (back - n).abs().max().item()
    print(f"analytic TAESD depth round trip: max |err| {err:.2e} (bound {2 * s * s / 27:.2e})")
    assert (back - closed).abs().max() < 1e-5  # the code path is exactly the analytic codec
    assert err <= 2 * s * s / 27 + 1e-5  # y - 3 tanh(y / 3) <= y³ / 27, y = s * x01 <= s
    wide = torch.cat([encode_depth(taesd, -n), z], 1)  # [rgb | depth] latent: rgb = a gray image of -n
    with torch.no_grad():
        rgb, depth = decode_rgbd(taesd, wide, MODS)
    assert rgb.shape == (1, 3, 128, 128) and torch.allclose(depth, back, atol=1e-6)
    assert torch.allclose(rgb, taesd.decode(wide[:, :4]), atol=1e-6)


# -------------------------------------------------------------------------------------- modes
def test_compose_per_mode():
    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x, given, noise = (torch.randn(3, k, 4, 4, generator=g) for k in (8, 4, 4))
    xi, tm = compose(x, 700, RGBDMode("joint"), MODS, ac)
    assert xi is x and tm.tolist() == [[700, 700]] * 3
    xi, tm = compose(x, 700, RGBDMode("image-to-depth"), MODS, ac, given, noise)
    a = float(ac[700])
    assert torch.allclose(xi[:, :4], a ** 0.5 * given + (1 - a) ** 0.5 * noise) and torch.equal(xi[:, 4:], x[:, 4:])
    assert tm.tolist() == [[700, 700]] * 3
    xi, tm = compose(x, 700, RGBDMode("depth-to-image", "clean"), MODS, ac, given)
    assert torch.equal(xi[:, 4:], given) and torch.equal(xi[:, :4], x[:, :4]) and tm.tolist() == [[700, 0]] * 3
    done = finish(x, RGBDMode("depth-to-image"), MODS, given)
    assert torch.equal(done[:, 4:], given) and torch.equal(done[:, :4], x[:, :4])
    with pytest.raises(ValueError, match="needs the given rgb"):
        compose(x, 700, RGBDMode("image-to-depth"), MODS, ac)
    with pytest.raises(ValueError, match="unknown rgbd mode"):
        RGBDMode("depth")


def test_pipeline_switches_modes_per_call():
    """One tiny-rgbd model, modes chosen per call through the unchanged sampler code."""
    from models.depth import to_image
    from runtime.pipeline import SamplingConfig, animate, encode_source, load_models
    m = load_models("tiny-rgbd", need_taesd=True)
    g = torch.Generator().manual_seed(1)
    src, pose = (torch.rand(k, 3, 128, 128, generator=g) * 2 - 1 for k in (1, 2))
    dep = torch.rand(2, 1, 128, 128, generator=g) * 2 - 1
    cfg = SamplingConfig(sampler="lcm", steps=2)

    def run(mode=None, given=None):
        return animate(m.model, m.context, src, pose, pose.flip(0), cfg, m.taesd, m.taesd, mode=mode, given=given)
    joint, again = run(), run(RGBDMode("joint"))
    assert torch.equal(joint.latents, again.latents)  # default mode is joint; runs are deterministic
    assert joint.images.shape == (2, 3, 128, 128) and joint.depth.shape == (2, 1, 128, 128)
    assert joint.depth.min() >= -1 and joint.depth.max() <= 1
    i2d = run(RGBDMode("image-to-depth"), pose)
    i2d_clean = run(RGBDMode("image-to-depth", "clean"), pose)
    d2i = run(RGBDMode("depth-to-image"), dep)
    with torch.no_grad():
        z_rgb, z_dep = encode_source(m.model, pose, m.taesd), encode_source(m.model, to_image(dep), m.taesd)
    assert torch.equal(group(i2d.latents, MODS, "rgb"), z_rgb)   # the given modality is kept exactly
    assert torch.equal(group(d2i.latents, MODS, "depth"), z_dep)
    for a, b in ((joint, i2d), (i2d, i2d_clean)):  # the given latent and how it enters change the depth
        assert (group(a.latents, MODS, "depth") - group(b.latents, MODS, "depth")).abs().max() > 1e-3
    assert (group(joint.latents, MODS, "rgb") - group(d2i.latents, MODS, "rgb")).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs the given depth"):
        run(RGBDMode("depth-to-image"), pose)  # 3-channel frames are not depth
    rgb_only = load_models("tiny")
    with pytest.raises(ValueError, match="rgbd preset"):
        animate(rgb_only.model, rgb_only.context, src, pose, pose, cfg, mode=RGBDMode("joint"))


# ----------------------------------------------------------------------------------- relight
def sphere(n: int, radius: float = 0.8):
    """Depth of a sphere of radius R at distance 0 in image units (x in [-1, 1]), background +1,
    and its analytic unit normals (x, y, sqrt(R² - r²)) / R (x right, y up, z toward the viewer)."""
    c = (torch.arange(n, dtype=torch.float64) * 2 + 1) / n - 1
    x, y = c[None, :].expand(n, n), -c[:, None].expand(n, n)
    r2 = x ** 2 + y ** 2
    s = (radius ** 2 - r2).clamp(min=0).sqrt()
    depth = torch.where(r2 < radius ** 2, -s, torch.ones_like(s))[None, None]
    return depth, torch.stack([x, y, s])[None] / radius, r2


def test_normals_of_a_sphere():
    from runtime.relight import normals_from_depth
    worst = {}
    for n in (128, 256):
        depth, true, r2 = sphere(n)
        cos = (normals_from_depth(depth, relief=1.0) * true).sum(1)[0].clamp(-1, 1)
        worst[n] = torch.rad2deg(torch.acos(cos))[r2 < (0.9 * 0.8) ** 2].max().item()
    print(f"sphere normals, max angle error inside 0.9 R: {worst}")
    assert worst[128] < 0.25 and worst[256] < 0.3 * worst[128]  # central differences: second order


def test_relight_shades_a_sphere():
    from runtime.relight import RelightConfig, light_direction, normals_from_depth, relight, shade
    depth, true, r2 = sphere(128)
    light = light_direction(40, 25)
    assert torch.allclose(light_direction(0, 0), torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(light_direction(90, 0), torch.tensor([1.0, 0.0, 0.0]), atol=1e-7)
    gray = torch.full((1, 3, 128, 128), 0.2, dtype=torch.float64)  # 0.6 in [0, 1]
    lambert = RelightConfig(relief=1.0, ambient=0.0, specular=0.0)
    out = relight(gray, depth, light, lambert)
    expected = 0.6 * (true * light.double().reshape(1, 3, 1, 1)).sum(1, keepdim=True).clamp(min=0) * 2 - 1
    inside = (r2 < (0.9 * 0.8) ** 2)[None, None].expand_as(out)
    assert (out - expected)[inside].abs().max() < 5e-3
    assert torch.allclose(out[:, :, r2 >= 0.8 ** 2], gray[:, :, r2 >= 0.8 ** 2], atol=1e-12)  # background as is
    full = RelightConfig(relief=1.0)  # with ambient and a highlight: the fused path = shade(normals)
    diffuse, spec = shade(normals_from_depth(depth, 1.0), light.double(), full.shininess)
    ref = ((0.6 * (full.ambient + (1 - full.ambient) * diffuse) + full.specular * spec).clamp(0, 1) * 2 - 1)
    got = relight(gray, depth, light, full)
    fg = (depth < full.background).expand_as(got)
    assert (got - ref.expand_as(got))[fg].abs().max() < 1e-12
    assert torch.allclose(relight(gray, depth, light, RelightConfig(strength=0.0)), gray, atol=1e-12)
    with pytest.raises(ValueError, match="must be"):
        relight(gray, depth[:, :, :64], light)


@pytest.mark.gpu
def test_relight_on_gpu_matches_cpu_without_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (relighting on the GPU)")
    from runtime.relight import light_from_screen, relight, to_device
    depth, _, _ = sphere(256)
    rgb = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    light = light_from_screen(0.3, -0.4)
    cpu = relight(rgb, depth.float(), light)
    d_rgb, d_depth, d_light = rgb.cuda(), depth.float().cuda(), to_device(light, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside relight raises
    try:
        gpu = relight(d_rgb, d_depth, d_light)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (gpu.cpu() - cpu).abs().max() < 1e-4


# --------------------------------------------------------------------------------------- ONNX
def test_widened_stream_unet_onnx_parity(tmp_path):
    """The widened streaming UNet through the one exporter: ORT vs torch (fp32 1e-4, fp16 3e-2 as in
    tests/test_export.py), t per modality, and the layout recorded in the manifest."""
    ort = pytest.importorskip("onnxruntime")
    from engines.manifest import Manifest
    from export.__main__ import export_all
    from export.spec import ExportOptions
    from export.specs import ModelSource, build_specs
    cfg = XPortraitConfig.from_name("tiny-rgbd")
    opts = ExportOptions(latent_hw=(16, 16), window=2, slots=3)
    folders = export_all("tiny-rgbd", tmp_path, ("fp32", "fp16"), ("unet_stream",), opts, log=lambda *a: None)
    spec = build_specs(cfg)["unet_stream"]
    feed = spec.sample_inputs(opts, seed=1)
    assert feed["x"].shape == (1, 8, 16, 16) and feed["t"].shape == (1, 2)
    with torch.no_grad():
        ref = spec.build(ModelSource(cfg), opts)(*(feed[t.name] for t in spec.inputs))
    for prec, bound in (("fp32", 1e-4), ("fp16", 3e-2)):
        m = Manifest.load(folders[prec] / "manifest.json")
        assert m.preset["latent_layout"]["groups"] == {"rgb": [0, 4], "depth": [4, 8]}
        assert {t.name: t.shape for t in m.engine("unet_stream").inputs}["t"] == [1, 2]
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = 1, 3
        sess = ort.InferenceSession(str(folders[prec] / "unet_stream.onnx"), so, providers=["CPUExecutionProvider"])
        want = {i.name: i.type for i in sess.get_inputs()}
        arrays = {k: v.numpy().astype(np.float16) if want[k] == "tensor(float16)" else v.numpy()
                  for k, v in feed.items()}
        got = sess.run(None, arrays)
        errs = [float(np.abs(g.astype(np.float32) - r.numpy()).max() / r.abs().max()) for g, r in zip(got, ref)]
        print(f"unet_stream tiny-rgbd {prec}: max rel err {max(errs):.2e}")
        assert got[0].shape == (1, 8, 16, 16) and max(errs) <= bound
