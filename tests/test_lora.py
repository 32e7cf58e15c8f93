"""kohya LoRA fusion: name mapping and the fused weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from models.lora import fuse_lora, kohya_name, ldm_to_diffusers
from models.weights import CheckpointError


def test_mapping_covers_the_lcm_lora_target_set():
    """67,252,224 = rank-64 parameter count of LCM-LoRA's target modules (depth-lcm-taesd.md §2.5)."""
    from models.config import XPortraitConfig
    from models.unet import MainUNet
    cfg = XPortraitConfig.from_name("sd15")
    with torch.device("meta"):
        unet = MainUNet(cfg.unet, cfg.motion)
    targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
    total = 0
    for ours, theirs in ldm_to_diffusers(unet).items():
        if theirs.endswith(targets):
            w = unet.get_submodule(ours).weight
            total += 64 * (w[0].numel() + w.shape[0])
    assert total == 67_252_224
    m = ldm_to_diffusers(unet)
    assert m["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert m["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert m["input_blocks.6.0.op"] == "down_blocks.1.downsamplers.0.conv"
    assert m["middle_block.1.transformer_blocks.0.attn2.to_k"] == "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    assert m["input_blocks.4.0.skip_connection"] == "down_blocks.1.resnets.0.conv_shortcut"


def _lora(unet, modules: dict[str, str], rank: int, alpha: float, g) -> dict:
    sd = {}
    for ours, theirs in modules.items():
        w = unet.get_submodule(ours).weight
        k = kohya_name(theirs)
        if w.ndim == 4:
            sd[k + ".lora_down.weight"] = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g)
            sd[k + ".lora_up.weight"] = torch.randn(w.shape[0], rank, 1, 1, generator=g)
        else:
            sd[k + ".lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g)
            sd[k + ".lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g)
        sd[k + ".alpha"] = torch.tensor(alpha)
    return sd


def test_fuse_linear_and_conv(tiny_model, tmp_path):
    unet = tiny_model.unet
    mods = {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "output_blocks.5.0.in_layers.2": "up_blocks.1.resnets.2.conv1",
            "middle_block.1.proj_in": "mid_block.attentions.0.proj_in"}
    g = torch.Generator().manual_seed(3)
    sd = _lora(unet, mods, rank=4, alpha=2.0, g=g)
    before = {k: unet.get_submodule(k).weight.clone() for k in mods}
    save_file(sd, str(tmp_path / "lcm.safetensors"))
    counts = fuse_lora({"unet": unet}, tmp_path / "lcm.safetensors", scale=0.7)
    assert counts == {"unet": 3}
    for ours, theirs in mods.items():
        k = kohya_name(theirs)
        up, down = sd[k + ".lora_up.weight"], sd[k + ".lora_down.weight"]
        expect = before[ours] + 0.7 * (2.0 / 4) * torch.einsum("or,r...->o...", up.flatten(1), down)
        assert torch.allclose(unet.get_submodule(ours).weight, expect.reshape(before[ours].shape), atol=1e-5)


def test_fuse_errors(tiny_model):
    unet = tiny_model.unet
    with pytest.raises(CheckpointError, match="match no layer"):
        fuse_lora({"unet": unet}, {"lora_unet_down_blocks_9_x.lora_down.weight": torch.zeros(1, 1),
                                   "lora_unet_down_blocks_9_x.lora_up.weight": torch.zeros(1, 1)})
    with pytest.raises(CheckpointError, match="kohya"):
        fuse_lora({"unet": unet}, {"unet.down_blocks.0.lora_A.weight": torch.zeros(1, 1)})
    g = torch.Generator().manual_seed(0)
    sd = _lora(unet, {"input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in"}, 4, 4.0, g)
    sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.zeros(7, 4, 1, 1)
    with pytest.raises(CheckpointError, match="do not fit"):
        fuse_lora({"unet": unet}, sd)
