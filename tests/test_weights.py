"""Checkpoint loading on files the tests write (real key names and shapes, random values)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from models.weights import CheckpointError, load_sd15_base, load_taesd, load_xportrait, read_state_dict
from tests.conftest import ROOT


def _official_sd(model) -> dict:
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return sd


@pytest.mark.parametrize("fmt", ["th", "safetensors"])
def test_official_checkpoint_roundtrip(tiny_model, tmp_path, fmt):
    from models.config import XPortraitConfig
    from models.xportrait import XPortrait
    sd = _official_sd(tiny_model)
    path = tmp_path / f"model_state-415001.{fmt}"
    if fmt == "th":
        torch.save({"state_dict": sd}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    fresh = XPortrait(XPortraitConfig.from_name("tiny"), with_text_encoder=True)
    load_xportrait(fresh, path)
    got = fresh.state_dict()
    for k in ("model.diffusion_model.out.2.weight", "appearance_control_model.input_hint_block.14.bias",
              "cond_stage_model.transformer.text_model.final_layer_norm.weight",
              "model.diffusion_model.output_blocks_motion_module.11.0.temporal_transformer.proj_out.weight"):
        assert torch.equal(got[k], sd[k]), k


def test_missing_and_misshaped_keys_are_named(tiny_model, tmp_path):
    sd = _official_sd(tiny_model)
    del sd["pose_control_model.zero_convs.3.0.weight"]
    sd["first_stage_model.quant_conv.bias"] = torch.zeros(3)
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_xportrait(tiny_model, sd)
    msg = str(e.value)
    assert "pose_control_model.zero_convs.3.0.weight" in msg and "first_stage_model.quant_conv.bias" in msg
    assert "model.diffusion_model.extra.weight" in msg and "fix:" in msg


class Arbitrary:
    """A class a pickle could instantiate: weights_only loading must refuse it."""


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.th"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "obj": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)


def test_truncated_file_gives_clear_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="re-download"):
        read_state_dict(path)


def test_sd15_base_fills_unet_reference_and_controlnets(tiny_model, tmp_path):
    unet = tiny_model.unet
    sd = {f"model.diffusion_model.{k}": torch.randn_like(v) for k, v in unet.state_dict().items()
          if "motion_module" not in k}
    sd.update({f"first_stage_model.{k}": torch.randn_like(v) for k, v in tiny_model.first_stage_model.state_dict().items()})
    sd.update({f"cond_stage_model.transformer.{k}": torch.randn_like(v)
               for k, v in tiny_model.cond_stage_model.transformer.state_dict().items()})
    sd["model_ema.decay"] = torch.tensor(0.999)
    sd["alphas_cumprod"] = tiny_model.alphas_cumprod.clone()
    path = tmp_path / "v1-5-pruned.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    report = load_sd15_base(tiny_model, path)
    k = "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    src = sd["model.diffusion_model." + k]
    assert torch.equal(tiny_model.unet.get_parameter(k), src)
    assert torch.equal(tiny_model.appearance_control_model.get_parameter(k), src)
    assert torch.equal(tiny_model.pose_control_model.get_parameter(k), src)
    assert torch.equal(tiny_model.local_pose_control_model.get_parameter(k), src)
    nl = report["not_loaded"]
    assert any("motion_module" in k for k in nl) and any("input_hint_block" in k for k in nl)
    assert any("zero_convs" in k for k in nl) and not any(k.startswith("first_stage_model") for k in nl)
    sd["some.other.key"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="some.other.key"):
        load_sd15_base(tiny_model, sd)


def test_sd15_base_rejects_an_xportrait_shaped_mismatch(tiny_model):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 3, 3)}
    with pytest.raises(CheckpointError, match="SD1.5 UNet"):
        load_sd15_base(tiny_model, sd)


def test_taesd_both_layouts(tmp_path):
    from models.config import TAESDConfig
    from models.taesd import TAESD
    cfg = TAESDConfig()  # real width: the public files' shapes
    src = TAESD(cfg)
    enc = {k: 0.05 * torch.randn_like(v) for k, v in src.encoder.state_dict().items()}
    dec = {k: 0.05 * torch.randn_like(v) for k, v in src.decoder.state_dict().items()}
    assert "1.conv.0.weight" in enc and "0.weight" in enc and "1.weight" in dec  # public key layout
    torch.save(enc, tmp_path / "taesd_encoder.pth")
    save_file(dec, str(tmp_path / "taesd_decoder.safetensors"))
    a = TAESD(cfg)
    load_taesd(a, tmp_path / "taesd_encoder.pth", tmp_path / "taesd_decoder.safetensors")
    diff = {f"encoder.layers.{k}": v for k, v in enc.items()}
    for k, v in dec.items():
        i, rest = k.split(".", 1)
        diff[f"decoder.layers.{int(i) - 1}.{rest}"] = v
    b = TAESD(cfg)
    load_taesd(b, diffusers=diff)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        za, zb = a.latent(x), b.latent(x)
        assert za.shape == (1, 4, 8, 8) and torch.isfinite(za).all() and torch.equal(za, zb)
        assert torch.equal(a.decode(za), b.decode(zb)) and a.decode(za).shape == (1, 3, 64, 64)
    enc["14.weight"] = torch.zeros(4, 64, 1, 1)
    with pytest.raises(CheckpointError, match="14.weight"):
        load_taesd(a, encoder=enc)


def test_check_keys_cli_on_full_manifest(golden_dir, tmp_path):
    cmd = [sys.executable, "-m", "models.weights", "check-keys"]
    r = subprocess.run(cmd + [str(golden_dir / "full_keys.json"), "--preset", "sd15"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "all 3082 keys" in r.stdout, r.stdout + r.stderr
    d = json.loads((golden_dir / "full_keys.json").read_text())
    d["keys"].pop("appearance_control_model.middle_block.1.proj_out.bias")
    d["keys"]["first_stage_model.decoder.conv_out.weight"]["shape"] = [3, 64, 3, 3]
    bad = tmp_path / "bad_keys.json"
    bad.write_text(json.dumps(d))
    r = subprocess.run(cmd + [str(bad), "--preset", "sd15"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "appearance_control_model.middle_block.1.proj_out.bias" in r.stderr
    assert "first_stage_model.decoder.conv_out.weight" in r.stderr
