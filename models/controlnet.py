"""SD1.5 ControlNet as used for both the pose hint and the local eyes/mouth hint (spec §2.4).

The hint encoder depends only on the hint image, so it is separable: `encode_hint()` once per
driving frame, `forward(x, t, context, hint_feat)` once per frame and step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.config import UNetConfig
from models.layers import AttnIO
from models.unet import UNetBody, hint_block


class ControlNet(UNetBody):
    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg, with_decoder=False)
        self.input_hint_block = hint_block(cfg)
        self.zero_convs = nn.ModuleList([nn.Sequential(nn.Conv2d(w, w, 1)) for w in self.input_widths])
        self.middle_block_out = nn.Sequential(nn.Conv2d(self.mid_width, self.mid_width, 1))

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """hint: (B, 3, H, W) in [-1, 1] -> (B, model_channels, H/8, W/8)."""
        return self.input_hint_block(hint)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                hint_feat: torch.Tensor) -> list[torch.Tensor]:
        """Returns 13 residuals: zero_convs[i](input_blocks[i] output), then middle_block_out."""
        emb = self.embed(t, x.dtype)
        attn = AttnIO()
        outs, h = [], x
        for i, (block, zc) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context, attn)
            if i == 0:
                h = h + hint_feat
            outs.append(zc(h))
        h = self.middle_block(h, emb, context, attn)
        outs.append(self.middle_block_out(h))
        return outs
