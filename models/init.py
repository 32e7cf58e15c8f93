"""Seeded random initialisation for presets (tests and benchmarks run without real weights).

Scheme (the golden sets' own, ../shared/golden/xportrait/README.json "randomization", so that
every path contributes): matrices N(0, (gain / sqrt(fan_in))^2); 1-D norm scales 1 + 0.1 N(0,1);
biases 0.1 N(0,1); buffers (schedule, positional tables) keep their computed values. Gains: 1.7 for
ControlNet hint convs, 0.3 for ControlNet output (zero) convs, latent-scale-aware gains for the
VAE's quant convs, and `residual_gain` for the last layer of every residual branch. The last one
keeps activations O(1) at sd15 depth in fp16 (measured in tests/test_init.py; the official zero-
initialised layers are exactly these residual-branch outputs).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

RESIDUAL_OUT = ("out_layers.3.weight", "proj_out.weight", "to_out.0.weight", "ff.net.2.weight",
                "conv2.weight")


def _gain(name: str, residual_gain: float, scale_factor: float) -> float:
    if ".input_hint_block." in name:
        return 1.7
    if ".zero_convs." in name or ".middle_block_out." in name:
        return 0.3
    if name.endswith("post_quant_conv.weight"):
        return scale_factor
    if name.endswith(RESIDUAL_OUT):
        return residual_gain
    return 1.0


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0, residual_gain: float = 0.5, scale_factor: float = 0.18215) -> nn.Module:
    """Initialise every parameter of `model` in place from one generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        buf = torch.empty(p.shape, dtype=torch.float32)
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            buf.normal_(0.0, _gain(name, residual_gain, scale_factor) / math.sqrt(fan_in), generator=g)
            if name.endswith("quant_conv.weight") and not name.endswith("post_quant_conv.weight"):
                half = p.shape[0] // 2  # posterior mean rows: latent = 0.18215 * mean should be O(1)
                buf[:half] *= 2.5 / scale_factor
        elif name.endswith("bias"):
            buf.normal_(0.0, 0.1, generator=g)
        else:
            buf.normal_(0.0, 1.0, generator=g).mul_(0.1).add_(1.0)
        p.copy_(buf)
    return model
