"""Thin nn.Module wrappers that give each exported graph flat, named tensor I/O.

forward(*inputs) takes tensors in the order of the spec's inputs and returns a tuple in the order of
its outputs (export/specs.py). The wrappers only route tensors; every computation is the model's
own (models/). The text context enters every graph as (1, 77, C) and is broadcast to the batch
inside the graph, so the host keeps a single copy.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.streaming import StreamingUNet


class Encode(nn.Module):
    """image (1, 3, 8h, 8w) in [-1, 1] -> scaled latent (1, 4, h, w) (KL posterior mean, or TAESD)."""

    def __init__(self, ae: nn.Module):
        super().__init__()
        self.ae = ae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.ae.latent(image),)


class Decode(nn.Module):
    """scaled latent (B, 4, h, w) -> image (B, 3, 8h, 8w), nominally [-1, 1] (unclamped)."""

    def __init__(self, ae: nn.Module):
        super().__init__()
        self.ae = ae

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.ae.decode(latent),)


class Reference(nn.Module):
    """Reference net + projection with the main UNet's attn1 K/V weights -> 16 (K_ref, V_ref) pairs."""

    def __init__(self, refnet: nn.Module, unet: nn.Module):
        super().__init__()
        self.refnet = refnet
        self.attn1 = nn.ModuleList(unet.attn1_layers())  # only their to_k/to_v end up in the graph

    def forward(self, ref_latent: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> tuple:
        bank = self.refnet(ref_latent, t, context)
        return tuple(kv for layer, b in zip(self.attn1, bank) for kv in layer.project_kv(b))


class Hint(nn.Module):
    """Both ControlNet hint encoders (step-invariant, once per frame)."""

    def __init__(self, pose: nn.Module, local: nn.Module):
        super().__init__()
        self.pose, self.local = pose, local

    def forward(self, pose_hint: torch.Tensor, local_hint: torch.Tensor) -> tuple:
        return self.pose.encode_hint(pose_hint), self.local.encode_hint(local_hint)


class Control(nn.Module):
    """Pose + local ControlNet bodies, their 13 residuals summed in-graph (both at scale 1, spec §4.3)."""

    def __init__(self, pose: nn.Module, local: nn.Module):
        super().__init__()
        self.pose, self.local = pose, local

    def forward(self, x, t, context, pose_feat, local_feat) -> tuple:
        ctx = context.expand(x.shape[0], -1, -1)
        return tuple(p + q for p, q in zip(self.pose(x, t, ctx, pose_feat), self.local(x, t, ctx, local_feat)))


def _split_cond(rest: tuple, n_ref: int, n_ctrl: int) -> tuple[list, list, tuple]:
    ref = rest[:2 * n_ref]
    return [(ref[2 * i], ref[2 * i + 1]) for i in range(n_ref)], list(rest[2 * n_ref:2 * n_ref + n_ctrl]), \
        rest[2 * n_ref + n_ctrl:]


class UNet(nn.Module):
    """Full-window main UNet: T frames form one temporal window (bidirectional motion attention).

    conditional: inputs x, t, context, ref_k/v_00..15 (interleaved), ctrl_00..12; otherwise
    x, t, context only (the official unconditional branch: no reference tokens, no residuals).
    """

    def __init__(self, unet: nn.Module, conditional: bool, n_ref: int = 16, n_ctrl: int = 13):
        super().__init__()
        self.unet, self.conditional, self.n_ref, self.n_ctrl = unet, conditional, n_ref, n_ctrl

    def forward(self, x, t, context, *rest) -> tuple[torch.Tensor]:
        ctx = context.expand(x.shape[0], -1, -1)
        ref_kv = control = None
        if self.conditional:
            ref_kv, control, _ = _split_cond(rest, self.n_ref, self.n_ctrl)
        return (self.unet(x, t, ctx, ref_kv=ref_kv, control=control, frames=x.shape[0]),)


class UNetStream(nn.Module):
    """Streaming main UNet (models/streaming.py): one new frame per element + temporal ring caches.

    Inputs: x, t (B,), context, [ref_k/v x 16 of batch B (one source per element), ctrl x 13 if
    conditional], write_slot, n_past (B,) int32 (one counter pair per element), k_cache_00, v_cache_00,
    ..., v_cache_39 (L, B*H_l*W_l, C_l). Outputs: eps, k_new_00, v_new_00, ..., v_new_39. The graph
    never writes the rings (write_ring=False): the host stores k_new/v_new (models.streaming.ring_write).
    The positional tables W_k·pe / W_v·pe enter the graph as constants.
    """

    def __init__(self, unet: nn.Module, conditional: bool, n_ref: int = 16, n_ctrl: int = 13):
        super().__init__()
        self.stream = StreamingUNet(unet)
        self.conditional, self.n_ref, self.n_ctrl = conditional, n_ref, n_ctrl

    def forward(self, x, t, context, *rest) -> tuple:
        ref_kv = control = None
        if self.conditional:
            ref_kv, control, rest = _split_cond(rest, self.n_ref, self.n_ctrl)
        write_slot, n_past, caches = rest[0], rest[1], rest[2:]
        eps, k_new, v_new = self.stream(x, t, context.expand(x.shape[0], -1, -1), ref_kv, control,
                                        list(caches[0::2]), list(caches[1::2]), write_slot, n_past)
        return (eps, *(kv for pair in zip(k_new, v_new) for kv in pair))
