"""Building blocks of the LDM / SD1.5 UNet family (spec §2.1), with the official state-dict names.

Module attribute names and Sequential indices reproduce the official key layout exactly
(e.g. `in_layers.2`, `emb_layers.1`, `transformer_blocks.0.attn1.to_out.0`), so official
checkpoints load with strict=True and no renaming.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import attention, reference_attention


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ordered [cos | sin] (LDM convention). t: (B,) -> (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input and parameter dtypes (official GroupNorm32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).type(x.dtype)


def norm32(ch: int) -> GroupNorm32:
    return GroupNorm32(32, ch, eps=1e-5)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + projected time embedding (added), GN-SiLU-conv, + skip (1x1 if widths differ)."""

    def __init__(self, ch: int, emb_dim: int, out_ch: int):
        super().__init__()
        self.in_layers = nn.Sequential(norm32(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(norm32(out_ch), nn.SiLU(), nn.Identity(),  # .2 = dropout slot
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention: to_q/k/v without bias, to_out.0 with bias, scale D^-0.5."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        kv_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Identity())
        self.use_kernels = False  # set by XPortrait.set_attention_kernels()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                ref_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        if ref_kv is None:
            out = attention(q, k, v, self.heads)
        else:
            out = reference_attention(q, k, v, ref_kv[0], ref_kv[1], self.heads, self.use_kernels)
        return self.to_out(out)

    def project_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of extra tokens with this layer's weights: the cacheable reference K/V (spec §3.3)."""
        return self.to_k(tokens), self.to_v(tokens)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, inner = 4*dim; keys net.0.proj and net.2."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """attn1 (self, optionally + reference tokens), attn2 (text), GEGLU FF; each pre-LN residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn: "AttnIO") -> torch.Tensor:
        n = self.norm1(x)
        if attn.record is not None:  # reference net, 'write' mode: bank the normed tokens
            attn.record.append(n)
            if attn.stop_after_record():
                return x
        x = x + self.attn1(n, ref_kv=attn.next_ref())
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class AttnIO:
    """Per-forward reference-attention plumbing (replaces the official global 'attention bank').

    Read side: `ref_kv` is the list of per-layer (K_ref, V_ref), consumed in block order.
    Write side: `record` collects each block's LN1 output; `record_limit` stops the forward once
    that many entries exist (the reference net's compute after its last bank entry is dead).
    """

    def __init__(self, ref_kv: list | None = None, record: list | None = None, record_limit: int = -1):
        self.ref_kv, self.record, self.record_limit, self._i = ref_kv, record, record_limit, 0

    def next_ref(self):
        if self.ref_kv is None:
            return None
        kv = self.ref_kv[self._i]
        self._i += 1
        return kv

    def stop_after_record(self) -> bool:
        return self.record_limit > 0 and len(self.record) >= self.record_limit


class SpatialTransformer(nn.Module):
    """GroupNorm(eps 1e-6) -> 1x1 proj_in -> transformer block(s) -> 1x1 proj_out -> + input."""

    def __init__(self, ch: int, heads: int, depth: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(ch, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn: AttnIO) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        for blk in self.transformer_blocks:
            t = blk(t, context, attn)
            if attn.record is not None and attn.stop_after_record():
                return x
        t = t.transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(t)


class TimestepBlock(nn.Sequential):
    """One entry of input_blocks/middle_block/output_blocks: routes emb/context to its layers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, attn: AttnIO) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, attn)
            else:
                x = layer(x)
        return x
