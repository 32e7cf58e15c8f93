"""AnimateDiff-v1 'Vanilla' temporal motion module as X-Portrait uses it (spec §5).

Input (B*F, C, H, W) with F frames per window. GroupNorm -> proj_in -> one temporal transformer
block (two temporal self-attentions, each with the sinusoidal position table added to its
LayerNorm output, then a GEGLU FF) -> proj_out -> + input. Attention runs along the frame axis,
separately for every spatial position. Keys: `{i}.0.temporal_transformer.*` (the official list
holds each module inside a one-element Sequential).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.attention import attention
from models.layers import Attention, FeedForward


def sinusoid_table(max_len: int, dim: int) -> torch.Tensor:
    """(1, max_len, dim): pe[p, 2i] = sin(p w_i), pe[p, 2i+1] = cos(p w_i), w_i = 10000^(-2i/dim)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(pos * div)
    pe[0, :, 1::2] = torch.cos(pos * div)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", sinusoid_table(max_len, dim))


class TemporalAttention(Attention):
    """'Temporal_Self' VersatileAttention: softmax over the F frames of each spatial position."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__(dim, heads)
        self.pos_encoder = PositionalEncoding(dim, max_len)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:  # x: (B*F, D, C)
        bf, d, c = x.shape
        b = bf // frames
        t = x.reshape(b, frames, d, c).transpose(1, 2).reshape(b * d, frames, c)  # (B*D, F, C)
        t = t + self.pos_encoder.pe[:, :frames].to(t.dtype)
        out = self.to_out(attention(self.to_q(t), self.to_k(t), self.to_v(t), self.heads))
        return out.reshape(b, d, frames, c).transpose(1, 2).reshape(bf, d, c)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_len) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = x + attn(norm(x), frames)
        return x + self.ff(self.ff_norm(x))


class TemporalTransformer(nn.Module):
    def __init__(self, ch: int, heads: int, max_len: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(ch, heads, max_len)])
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:  # (B*F, C, H, W)
        bf, c, h, w = x.shape
        t = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c))
        for blk in self.transformer_blocks:
            t = blk(t, frames)
        t = self.proj_out(t).reshape(bf, h, w, c).permute(0, 3, 1, 2)
        return x + t


class VanillaTemporalModule(nn.Module):
    def __init__(self, ch: int, heads: int, max_len: int):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(ch, heads, max_len)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self.temporal_transformer(x, frames)


class MotionSlot(nn.Sequential):
    """One official motion-module list entry: a one-element container, hence the `.0.` in keys."""

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self[0](x, frames)


def motion_module(ch: int, heads: int, max_len: int) -> MotionSlot:
    return MotionSlot(VanillaTemporalModule(ch, heads, max_len))
