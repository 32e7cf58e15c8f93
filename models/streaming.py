"""Streaming single-frame main UNet: causal temporal K/V ring caches (spec §5.3, option D).

Everything in the main UNet except the 20 motion modules is per frame. `StreamingUNet` runs one new
frame per stream through the spatial layers and, in each of the 40 motion-attention layers (20
modules x 2 temporal self-attentions), lets it attend to itself and to up to L-1 cached past frames.

Positional-encoding trick (spec §5.3): to_k/to_v have no bias and pe is added before them, so
K(frame, position p) = W_k·h + W_k·pe[p]. The cache holds the *raw* projections W_k·h, W_v·h, which
never change once written; the positional terms come from per-layer tables pe_k = W_k·pe,
pe_v = W_v·pe of shape (P, C) (P = 24, the pe buffer length), added when the frame is read. A frame
that ages by one step moves one position down without any rewrite.

Ring layout, per layer: k_cache, v_cache (L, R, C), R = streams x H_l x W_l rows (row = b*H_l*W_l + d),
C = heads x D. write_slot and n_past are int32 tensors of shape (1,). The frame j steps back
(1 <= j <= n_past) is in slot (write_slot - j) mod L and has position n_past - j; the new frame has
position n_past, and its raw K/V are returned (k_new, v_new), never read from the cache. Slot
write_slot is not read, so a host may write k_new/v_new into it as soon as the call returns.

Host protocol (one ring per layer, per denoising-step index and per CFG branch; write_slot and
n_past shared by all of them, since all advance once per frame):
    start:      write_slot = 0, n_past = 0 (cache contents are irrelevant: unused slots are masked)
    each step:  eps, k_new, v_new = unet_stream(x_t, t, ..., caches[step], write_slot, n_past)
                caches[step][layer][write_slot] = k_new[layer], v_new[layer]       (`ring_write`)
    each frame: write_slot = (write_slot + 1) mod L; n_past = min(n_past + 1, L - 1) (`ring_advance`)
With L = 16 (the trained window) a frame sees the 15 frames before it at positions 0..15.

The attention is causal: past frames are not refreshed by the new one (the trained windows attend
both ways, spec §5.3 (b)). Frame k of a stream equals frame k of the full-window UNet whose motion
attention is causally masked (sliding window of L frames, positions 0..n_past), which is what
tests/test_streaming.py checks. `motion_attention` below is the plain-PyTorch op with the signature
of kernels/motion_attention.py (which also writes the cache in place); it never writes, so it exports
to ONNX with the caches as inputs and k_new/v_new as outputs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.layers import Downsample, Upsample
from models.motion import MotionSlot
from models.unet import MainUNet


def motion_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, pe_k: torch.Tensor, pe_v: torch.Tensor,
                     write_slot: torch.Tensor, n_past: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention of the new frame over itself and its n_past cached frames, per row and head.

    q (R, C) includes W_q·pe[n_past]; k_new, v_new (R, C) raw; k_cache, v_cache (L, R, C) raw;
    pe_k, pe_v (P, C); write_slot, n_past int32 (1,). n_past is clamped to [0, min(L, P) - 1].
    Returns (R, C). Reads the cache in place (no gather): softmax attention does not care about
    slot order, so each slot just gets its own position and validity.
    """
    L, R, C = k_cache.shape
    D = C // heads
    n = n_past.long().clamp(0, min(L, pe_k.shape[0]) - 1)  # (1,)
    j = (write_slot.long() - torch.arange(L, device=q.device)) % L  # (L,) steps back of each slot
    valid = (j >= 1) & (j <= n)  # slot write_slot (j = 0) and slots older than n_past are unused
    pos = (n - j).clamp(min=0)  # (L,) temporal position of each slot
    k = k_cache + pe_k.index_select(0, pos)[:, None]  # (L, R, C)
    v = torch.where(valid[:, None, None], v_cache + pe_v.index_select(0, pos)[:, None], 0.0)  # unused may be NaN
    k_self = k_new + pe_k.index_select(0, n)  # (R, C)
    v_self = v_new + pe_v.index_select(0, n)

    qh = q.reshape(R, heads, 1, D) * D ** -0.5
    s_past = (qh @ k.reshape(L, R, heads, D).permute(1, 2, 3, 0)).reshape(R, heads, L)
    s_past = torch.where(valid, s_past, float("-inf"))
    s_self = (qh.reshape(R, heads, D) * k_self.reshape(R, heads, D)).sum(-1, keepdim=True)  # (R, heads, 1)
    p = torch.softmax(torch.cat([s_past, s_self], dim=-1), dim=-1)  # (R, heads, L + 1)
    out = (p[..., None, :L] @ v.reshape(L, R, heads, D).permute(1, 2, 0, 3)).reshape(R, heads, D)
    out = out + p[..., L:] * v_self.reshape(R, heads, D)
    return out.reshape(R, C)


def motion_layout(unet: MainUNet, h: int, w: int) -> list[tuple[int, int]]:
    """(H_l * W_l, C_l) of each of the 40 motion-attention layers, in cache order, for an h x w latent."""
    shapes, ds = [], 1
    for i, block in enumerate(unet.input_blocks):
        ds *= 2 if any(isinstance(m, Downsample) for m in block) else 1
        if i in unet.res_input_ids:
            shapes.append(((h // ds) * (w // ds), unet.input_widths[i]))
    for j, block in enumerate(unet.output_blocks):
        ds //= 2 if any(isinstance(m, Upsample) for m in block) else 1
        shapes.append(((h // ds) * (w // ds), unet.output_widths[j]))
    per_module = [len(b.attention_blocks) for b in _modules(unet)[0][0].temporal_transformer.transformer_blocks]
    return [s for s in shapes for _ in range(sum(per_module))]


def _modules(unet: MainUNet) -> list[MotionSlot]:
    return [*unet.input_blocks_motion_module, *unet.output_blocks_motion_module]


class StreamingUNet(nn.Module):
    """The main UNet for one new frame per stream, with causal temporal K/V caches (module docstring).

    Shares the weights of `unet`. forward(x, t, context, ref_kv, control, k_cache, v_cache,
    write_slot, n_past) -> (eps, k_new, v_new); k_cache/v_cache/k_new/v_new are lists over the
    40 motion-attention layers (`motion_layout` gives their shapes).
    """

    def __init__(self, unet: MainUNet):
        super().__init__()
        self.unet = unet

    @property
    def num_layers(self) -> int:
        return len(motion_layout(self.unet, 8, 8))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, ref_kv: list | None,
                control: list[torch.Tensor] | None, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor],
                write_slot: torch.Tensor, n_past: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        """x: (B, 4, h, w), one new frame per stream; t: (B,); context: (B, 77, Cctx); ref_kv, control
        as in MainUNet.forward (None for the unconditional branch)."""
        u = self.unet
        if len(k_cache) != self.num_layers or len(v_cache) != self.num_layers:
            raise ValueError(f"need {self.num_layers} k/v caches (one per motion-attention layer), "
                             f"got {len(k_cache)}/{len(v_cache)}")
        state = _Ring(iter(k_cache), iter(v_cache), write_slot, n_past, [], [])
        eps = u.run(x, t, context, ref_kv, control, lambda module, h: _stream_module(module, h, state))
        return eps, state.k_new, state.v_new


class _Ring:
    """Per-forward plumbing: cache iterators in layer order, the shared counters, collected outputs."""

    def __init__(self, k_cache, v_cache, write_slot, n_past, k_new: list, v_new: list):
        self.k_cache, self.v_cache, self.write_slot, self.n_past = k_cache, v_cache, write_slot, n_past
        self.k_new, self.v_new = k_new, v_new


def _stream_module(slot: MotionSlot, x: torch.Tensor, ring: _Ring) -> torch.Tensor:
    """One VanillaTemporalModule (models/motion.py) for a single frame per stream. x: (B, C, H, W)."""
    tt = slot[0].temporal_transformer
    b, c, hh, ww = x.shape
    h = tt.proj_in(tt.norm(x).permute(0, 2, 3, 1).reshape(b * hh * ww, c))  # (R, C), R = B*H*W
    for blk in tt.transformer_blocks:
        for attn, norm in zip(blk.attention_blocks, blk.norms):
            n = norm(h)
            pe = attn.pos_encoder.pe[0].to(n.dtype)  # (P, C)
            k_cache, v_cache = next(ring.k_cache), next(ring.v_cache)
            L = k_cache.shape[0]
            cur = ring.n_past.long().clamp(0, min(L, pe.shape[0]) - 1)
            q = attn.to_q(n + pe.index_select(0, cur))
            k_new, v_new = attn.to_k(n), attn.to_v(n)
            op = motion_attention
            if attn.use_kernels:  # XPortrait.set_attention_kernels(True): the Triton kernel, which also
                from kernels.motion_attention import motion_attention as op  # stores k_new/v_new in the slot
            o = op(q, k_new, v_new, k_cache, v_cache, attn.to_k(pe), attn.to_v(pe), ring.write_slot,
                   ring.n_past, attn.heads)
            h = h + attn.to_out(o)
            ring.k_new.append(k_new)
            ring.v_new.append(v_new)
        h = h + blk.ff(blk.ff_norm(h))
    return x + tt.proj_out(h).reshape(b, hh, ww, c).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------- host side
def alloc_ring(unet: MainUNet, slots: int, batch: int, h: int, w: int, dtype=torch.float32,
               device="cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed k/v caches for one (step, branch): 40 tensors (slots, batch*H_l*W_l, C_l) each."""
    shapes = [(slots, batch * n, c) for n, c in motion_layout(unet, h, w)]
    return ([torch.zeros(s, dtype=dtype, device=device) for s in shapes],
            [torch.zeros(s, dtype=dtype, device=device) for s in shapes])


def ring_write(k_cache: list, v_cache: list, k_new: list, v_new: list, write_slot: torch.Tensor) -> None:
    """Store the new frame's raw K/V in slot write_slot of every layer (in place, no host sync)."""
    idx = write_slot.long().reshape(1) % k_cache[0].shape[0]
    for kc, vc, kn, vn in zip(k_cache, v_cache, k_new, v_new):
        kc.index_copy_(0, idx, kn[None].to(kc.dtype))
        vc.index_copy_(0, idx, vn[None].to(vc.dtype))


def ring_advance(write_slot: torch.Tensor, n_past: torch.Tensor, slots: int) -> None:
    """After every step of a frame: next slot, one more past frame (at most slots - 1). In place."""
    write_slot.add_(1).remainder_(slots)
    n_past.add_(1).clamp_(max=slots - 1)
