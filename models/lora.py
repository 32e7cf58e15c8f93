"""Fuse kohya-format LoRA files (e.g. LCM-LoRA for SD1.5) into our LDM-layout UNets.

kohya keys name *diffusers* module paths with dots replaced by underscores:
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.{lora_down.weight,
lora_up.weight,alpha}`. We never split those names on underscores: we enumerate our own modules,
compute each one's diffusers path from the UNet structure (ldm_to_diffusers), and look the
kohya key up. Fusion: W += scale * (alpha / rank) * up @ down (convs reshaped), in float32.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from models.layers import Downsample, ResBlock, SpatialTransformer, Upsample
from models.weights import CheckpointError, read_state_dict

_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _block_names(layer: nn.Module, ours: str, theirs: str, out: dict[str, str]) -> None:
    for sub, mod in layer.named_modules():
        if not sub or not isinstance(mod, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)):
            continue
        if isinstance(layer, ResBlock):
            if sub in _RES:
                out[f"{ours}.{sub}"] = f"{theirs}.{_RES[sub]}"
        elif isinstance(layer, (Downsample, Upsample)):
            out[f"{ours}.{sub}"] = f"{theirs}.conv"
        else:  # SpatialTransformer: identical relative names
            out[f"{ours}.{sub}"] = f"{theirs}.{sub}"


def ldm_to_diffusers(unet: nn.Module) -> dict[str, str]:
    """Our module path -> diffusers UNet2DConditionModel module path, for the SD (non-motion) part."""
    n = unet.cfg.num_res_blocks + 1
    out = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}
    for i, block in enumerate(unet.input_blocks):
        if i == 0:
            out["input_blocks.0.0"] = "conv_in"
            continue
        b, r = divmod(i - 1, n)
        for j, layer in enumerate(block):
            theirs = (f"down_blocks.{b}.downsamplers.0" if isinstance(layer, Downsample) else
                      f"down_blocks.{b}.{'attentions' if isinstance(layer, SpatialTransformer) else 'resnets'}.{r}")
            _block_names(layer, f"input_blocks.{i}.{j}", theirs, out)
    mid = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}
    for j, layer in enumerate(unet.middle_block):
        _block_names(layer, f"middle_block.{j}", mid[j], out)
    for i, block in enumerate(getattr(unet, "output_blocks", [])):
        b, r = divmod(i, n)
        for j, layer in enumerate(block):
            theirs = (f"up_blocks.{b}.upsamplers.0" if isinstance(layer, Upsample) else
                      f"up_blocks.{b}.{'attentions' if isinstance(layer, SpatialTransformer) else 'resnets'}.{r}")
            _block_names(layer, f"output_blocks.{i}.{j}", theirs, out)
    if hasattr(unet, "out"):
        out.update({"out.0": "conv_norm_out", "out.2": "conv_out"})
    return out


def kohya_name(diffusers_path: str) -> str:
    return "lora_unet_" + diffusers_path.replace(".", "_")


def _group(sd: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for k, v in sd.items():
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if k.endswith(suffix):
                groups.setdefault(k[: -len(suffix)], {})[suffix] = v
                break
        else:
            bad.append(k)
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} keys are not kohya LoRA keys (e.g. {bad[:3]}); "
                              "convert PEFT/diffusers LoRAs to kohya format (lora_unet_*.lora_down/lora_up/alpha)")
    te = [g for g in groups if g.startswith("lora_te")]
    if te:
        raise CheckpointError(f"{source}: text-encoder LoRA modules ({te[:2]}...) are not supported: "
                              "X-Portrait uses a constant empty-prompt context; remove them from the file")
    return groups


@torch.no_grad()
def fuse_lora(nets: dict[str, nn.Module], source: str | Path | dict, scale: float = 1.0) -> dict[str, int]:
    """Fuse a kohya LoRA into each UNet-shaped net in `nets` (e.g. {"unet": model.unet}).

    Every LoRA module must land in at least one net; a LoRA module absent from one net (e.g. decoder
    layers for a ControlNet) is skipped for that net only. Returns modules fused per net.
    """
    sd = source if isinstance(source, dict) else read_state_dict(source)
    name = "LoRA state dict" if isinstance(source, dict) else str(source)
    groups = _group(sd, name)
    used: set[str] = set()
    counts = {}
    for net_name, net in nets.items():
        lookup = {kohya_name(theirs): ours for ours, theirs in ldm_to_diffusers(net).items()}
        counts[net_name] = 0
        for prefix, parts in groups.items():
            if prefix not in lookup:
                continue
            if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
                raise CheckpointError(f"{name}: {prefix} lacks lora_down or lora_up weight")
            module = net.get_submodule(lookup[prefix])
            down, up = parts[".lora_down.weight"].float(), parts[".lora_up.weight"].float()
            rank = down.shape[0]
            alpha = float(parts[".alpha"]) if ".alpha" in parts else float(rank)
            w = module.weight
            delta = (up.flatten(1) @ down.flatten(1))
            if delta.numel() != w.numel() or up.shape[0] != w.shape[0]:
                raise CheckpointError(f"{name}: {prefix} has rank-{rank} factors {tuple(up.shape)} x {tuple(down.shape)} "
                                      f"that do not fit {lookup[prefix]} {tuple(w.shape)}: LoRA for another base model?")
            w.copy_((w.float() + scale * alpha / rank * delta.reshape(w.shape)).to(w.dtype))
            used.add(prefix)
            counts[net_name] += 1
    unused = sorted(set(groups) - used)
    if unused:
        raise CheckpointError(f"{name}: {len(unused)} LoRA modules match no layer (e.g. {unused[:3]}); "
                              "is this an SD1.5 LoRA (not SDXL/SD2)?")
    return counts
