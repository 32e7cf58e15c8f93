"""Attention math used by every model module, with an optional Triton path.

All functions take heads packed in the channel dim: (B, N, C) with C = heads * D, i.e. the direct
outputs of the to_q/to_k/to_v Linear layers. `use_kernels=True` routes to the Triton kernels in
`kernels/` (CUDA, or CPU under TRITON_INTERPRET=1); otherwise plain PyTorch is used. The plain path
is the reference the kernels are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)  # (B, H, N, D)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v per head. q: (B, N, C); k, v: (B, M, C) -> (B, N, C)."""
    out = F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads))
    return _merge(out)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_ref: torch.Tensor, v_ref: torch.Tensor, heads: int,
                        use_kernels: bool = False) -> torch.Tensor:
    """Self-attention whose keys/values are the frame's own tokens followed by reference tokens.

    q, k, v: (B, N, C) of the frame; k_ref, v_ref: (1 or B, M, C), shared by all B frames (spec §3.2).
    """
    if use_kernels:
        from kernels.reference_attention import reference_attention as fused
        return fused(q, k, v, k_ref, v_ref, heads)
    b = q.shape[0]
    k_all = torch.cat([k, k_ref.expand(b, -1, -1)], dim=1)
    v_all = torch.cat([v, v_ref.expand(b, -1, -1)], dim=1)
    return attention(q, k_all, v_all, heads)
