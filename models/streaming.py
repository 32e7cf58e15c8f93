"""Streaming single-frame main UNet: causal temporal K/V ring caches (spec §5.3, option D).

Everything in the main UNet except the 20 motion modules is per frame. `StreamingUNet` runs one new
frame per element through the spatial layers and, in each of the 40 motion-attention layers (20
modules x 2 temporal self-attentions), lets it attend to itself and to up to `window` cached past
frames of the same element.

Elements: the batch E of one call. An element owns one ring: a (stream, denoising-step index) pair,
per CFG branch. Elements of one call may belong to different streams, be at different denoising steps
(t has shape (E,)), use their own reference K/V (batch E) or a shared one (batch 1), and have their own
counters, so they join, leave and reset independently ("stream batch").

Positional-encoding trick (spec §5.3): to_k/to_v have no bias and pe is added before them, so
K(frame, position p) = W_k·h + W_k·pe[p]. The ring holds the *raw* projections W_k·h, W_v·h, which
never change once written; the positional terms come from per-layer tables pe_k = W_k·pe,
pe_v = W_v·pe of shape (P, C) (P = 24, the pe buffer length), added when the frame is read. A frame
that ages by one step moves one position down without any rewrite. The tables are computed once per
attention layer (`PositionTables`), not per call, and are constants in exported graphs.

Ring layout, per layer: k_cache, v_cache (L, E*H_l*W_l, C_l), row = e*H_l*W_l + y*W_l + x, L = window
+ 1 slots, C = heads x D; rows contiguous, any slot stride (a row-slice view ring[:, a*HW:b*HW] of a
bigger ring works, no copy). Counters write_slot, n_past: int32 (E,), one pair per element. For
element e the frame j steps back (1 <= j <= n_past[e]) is in slot (write_slot[e] - j) mod L at
position n_past[e] - j; the new frame has position n_past[e]. Slot write_slot[e] is never read.

Window semantics: `window` = past frames the motion modules see, 0..15 (trained: 15, the 16-frame
window). Window 0 needs no ring at all: pass k_cache = v_cache = None and every motion module sees the
current frame only (at position 0), exactly the trained UNet on a 1-frame window.

Host protocol (no host sync anywhere; all helpers act in place on device tensors):
    start / reset of element e:  ring_reset(write_slot, n_past, [e])  (ring contents never need clearing)
    each step:  eps, k_new, v_new = unet_stream(x_t, t, ..., k_cache, v_cache, write_slot, n_past)
                then ring_write(k_cache, v_cache, k_new, v_new, write_slot) - or call the torch module
                with write_ring=True, which stores them itself, exactly once (then the host must not)
    each frame: ring_advance(write_slot, n_past, slots, active)  (active: elements that took a frame)

The attention is causal: past frames are not refreshed by the new one (the trained windows attend
both ways, spec §5.3 (b)). Frame k of a stream equals frame k of the full-window UNet whose motion
attention is causally masked (sliding window of L frames, positions 0..n_past), which is what
tests/test_streaming.py checks. `motion_attention` below is the plain-PyTorch op with the signature
of kernels/motion_attention.py; it never writes, so it exports to ONNX with the caches as inputs and
k_new/v_new as outputs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.layers import Downsample, Upsample
from models.motion import MotionSlot, TemporalAttention
from models.unet import MainUNet

MAX_WINDOW = 15  # past frames of the trained 16-frame window


def motion_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, pe_k: torch.Tensor, pe_v: torch.Tensor,
                     write_slot: torch.Tensor, n_past: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention of each element's new frame over itself and its n_past cached frames, per row and head.

    q (R, C) includes W_q·pe[n_past]; k_new, v_new (R, C) raw; k_cache, v_cache (L, R, C) raw, any
    slot stride, any dtype (cast to q's); pe_k, pe_v (P, C); write_slot, n_past int32 (E,), R = E
    equal row blocks. n_past is clamped to [0, min(L, P) - 1]. Returns (R, C). Reads the ring in place
    (no gather): softmax attention does not care about slot order, so each slot just gets its own
    position and validity per element.
    """
    L, R, C = k_cache.shape
    E, D = write_slot.shape[0], C // heads
    n = n_past.long().clamp(0, min(L, pe_k.shape[0]) - 1)  # (E,)
    j = (write_slot.long()[None] - torch.arange(L, device=q.device)[:, None]) % L  # (L, E) steps back
    valid = (j >= 1) & (j <= n)  # slot write_slot (j = 0) and slots older than n_past are unused
    pos = (n - j).clamp(min=0).reshape(-1)  # (L*E,) temporal position of each slot, per element
    k = k_cache.unflatten(1, (E, -1)).to(q.dtype) + pe_k.index_select(0, pos).reshape(L, E, 1, C)
    v = v_cache.unflatten(1, (E, -1)).to(q.dtype) + pe_v.index_select(0, pos).reshape(L, E, 1, C)
    v = torch.where(valid[:, :, None, None], v, 0.0)  # (L, E, HW, C); unused slots may hold NaN
    k_self = k_new.unflatten(0, (E, -1)) + pe_k.index_select(0, n)[:, None]  # (E, HW, C)
    v_self = v_new.unflatten(0, (E, -1)) + pe_v.index_select(0, n)[:, None]

    qh = q.unflatten(0, (E, -1)).unflatten(-1, (heads, 1, D)) * D ** -0.5  # (E, HW, heads, 1, D)
    s_past = (qh @ k.unflatten(-1, (heads, D)).permute(1, 2, 3, 4, 0)).squeeze(-2)  # (E, HW, heads, L)
    s_past = torch.where(valid.t()[:, None, None], s_past, float("-inf"))
    s_self = (qh.squeeze(-2) * k_self.unflatten(-1, (heads, D))).sum(-1, keepdim=True)  # (E, HW, heads, 1)
    p = torch.softmax(torch.cat([s_past, s_self], dim=-1), dim=-1)  # (E, HW, heads, L + 1)
    out = (p[..., None, :L] @ v.unflatten(-1, (heads, D)).permute(1, 2, 3, 0, 4)).squeeze(-2)
    out = out + p[..., L:] * v_self.unflatten(-1, (heads, D))  # (E, HW, heads, D)
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


class PositionTables:
    """pe (cast), W_k·pe and W_v·pe (P, C) of every motion-attention layer, computed once per layer.

    An entry is keyed by the identity, storage, dtype, device and in-place version of W_k, W_v and pe,
    so loading weights (load_state_dict copies in place), fusing a LoRA or moving the model recomputes
    it on its next use; `refresh()` drops every entry (e.g. after editing inference-mode weights, which
    have no version counter). Reading the key is host-only (no device sync).
    """

    def __init__(self):
        self._entries: dict[TemporalAttention, tuple[tuple, tuple[torch.Tensor, ...]]] = {}

    def refresh(self) -> None:
        self._entries.clear()

    @staticmethod
    def _key(attn: TemporalAttention, dtype: torch.dtype) -> tuple:
        ts = (attn.to_k.weight, attn.to_v.weight, attn.pos_encoder.pe)
        return (dtype, *((id(t), t.data_ptr(), t.dtype, t.device, -1 if t.is_inference() else t._version)
                         for t in ts))

    def get(self, attn: TemporalAttention, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pe, pe_k, pe_v) of `attn` for activations of `dtype`."""
        key = self._key(attn, dtype)
        hit = self._entries.get(attn)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            pe = attn.pos_encoder.pe[0].to(dtype)  # (P, C)
            tables = (pe, attn.to_k(pe), attn.to_v(pe))
        self._entries[attn] = (key, tables)
        return tables


class StreamingUNet(nn.Module):
    """The main UNet for one new frame per element, with causal temporal K/V rings (module docstring).

    Shares the weights of `unet`. forward(x, t, context, ref_kv, control, k_cache, v_cache,
    write_slot, n_past, write_ring=False) -> (eps, k_new, v_new); k_cache/v_cache/k_new/v_new are
    lists over the 40 motion-attention layers (`motion_layout` gives their shapes), or None / [] for
    window 0.
    """

    def __init__(self, unet: MainUNet):
        super().__init__()
        self.unet = unet
        self.num_layers = len(motion_layout(unet, 8, 8))
        self.tables = PositionTables()

    def refresh(self) -> None:
        """Recompute the positional tables on the next call (they also follow weight changes by themselves)."""
        self.tables.refresh()

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, ref_kv: list | None,
                control: list[torch.Tensor] | None, k_cache: list[torch.Tensor] | None,
                v_cache: list[torch.Tensor] | None, write_slot: torch.Tensor | None, n_past: torch.Tensor | None,
                write_ring: bool = False) -> tuple[torch.Tensor, list, list]:
        """x: (E, 4, h, w), one new frame per element; t: (E,); context: (E, 77, Cctx); ref_kv: 16
        (K_ref, V_ref) of batch 1 or E, control: 13 residuals (E, ...), both None for the unconditional
        branch. k_cache/v_cache: 40 rings (L, E*H_l*W_l, C_l), or None for window 0 (then the counters
        are ignored and k_new/v_new are empty). write_ring: store k_new/v_new in slot write_slot[e] in
        place (the kernel does it when kernels are on, else ring_write here), exactly once."""
        if (k_cache is None) != (v_cache is None):
            raise ValueError("pass both k_cache and v_cache, or neither (window 0: no ring)")
        if k_cache is not None:
            if len(k_cache) != self.num_layers or len(v_cache) != self.num_layers:
                raise ValueError(f"need {self.num_layers} k/v caches (one per motion-attention layer), "
                                 f"got {len(k_cache)}/{len(v_cache)}")
            _check_counters(write_slot, n_past, x.shape[0])
        state = _Ring(k_cache, v_cache, write_slot, n_past, write_ring, self.tables)
        eps = self.unet.run(x, t, context, ref_kv, control, lambda module, h: _stream_module(module, h, state))
        return eps, state.k_new, state.v_new


def _check_counters(write_slot, n_past, elements: int) -> None:
    for name, c in (("write_slot", write_slot), ("n_past", n_past)):
        if not isinstance(c, torch.Tensor) or c.dtype != torch.int32 or c.shape != (elements,):
            got = f"{c.dtype} {tuple(c.shape)}" if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"{name} must be an int32 tensor of shape ({elements},), one counter per element "
                             f"of the batch; got {got}")


class _Ring:
    """Per-forward plumbing: rings in layer order, the counters, the tables, collected outputs."""

    def __init__(self, k_cache, v_cache, write_slot, n_past, write: bool, tables: PositionTables):
        self.layer, self.k_cache, self.v_cache = 0, k_cache, v_cache
        self.write_slot, self.n_past, self.write, self.tables = write_slot, n_past, write, tables
        self.k_new: list[torch.Tensor] = []
        self.v_new: list[torch.Tensor] = []


def _stream_module(slot: MotionSlot, x: torch.Tensor, ring: _Ring) -> torch.Tensor:
    """One VanillaTemporalModule (models/motion.py) for a single frame per element. x: (E, C, H, W)."""
    tt = slot[0].temporal_transformer
    b, c, hh, ww = x.shape
    h = tt.proj_in(tt.norm(x).permute(0, 2, 3, 1).reshape(b * hh * ww, c))  # (R, C), R = E*H*W
    for blk in tt.transformer_blocks:
        for attn, norm in zip(blk.attention_blocks, blk.norms):
            pe, pe_k, pe_v = ring.tables.get(attn, h.dtype)
            n = norm(h)
            if ring.k_cache is None:  # window 0: softmax over the frame alone is 1, out = its value at position 0
                o = attn.to_v(n) + pe_v[0]
            else:
                o = _attend(attn, n, pe, pe_k, pe_v, ring, b)
            h = h + attn.to_out(o)
        h = h + blk.ff(blk.ff_norm(h))
    return x + tt.proj_out(h).reshape(b, hh, ww, c).permute(0, 3, 1, 2)


def _attend(attn: TemporalAttention, n: torch.Tensor, pe, pe_k, pe_v, ring: _Ring, elements: int) -> torch.Tensor:
    """Motion attention of one layer over its ring; stores k_new/v_new when ring.write (exactly once)."""
    k_cache, v_cache = ring.k_cache[ring.layer], ring.v_cache[ring.layer]
    if k_cache.shape[1:] != n.shape or v_cache.shape != k_cache.shape:
        raise ValueError(f"motion layer {ring.layer}: ring is {tuple(k_cache.shape)}/{tuple(v_cache.shape)}, "
                         f"expected (slots, {n.shape[0]}, {n.shape[1]}) = (slots, elements*H_l*W_l, C_l); "
                         "allocate it with alloc_ring(unet, slots, elements, h, w)")
    cur = ring.n_past.long().clamp(0, min(k_cache.shape[0], pe.shape[0]) - 1)  # (E,)
    q = attn.to_q((n.unflatten(0, (elements, -1)) + pe.index_select(0, cur)[:, None]).flatten(0, 1))
    k_new, v_new = attn.to_k(n), attn.to_v(n)
    if attn.use_kernels:  # XPortrait.set_attention_kernels(True): the Triton kernel
        from kernels.motion_attention import motion_attention as kernel
        kernel_writes = ring.write and k_cache.dtype == q.dtype
        o = kernel(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, ring.write_slot, ring.n_past, attn.heads,
                   write_cache=kernel_writes)
        host_writes = ring.write and not kernel_writes
    else:
        o = motion_attention(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, ring.write_slot, ring.n_past, attn.heads)
        host_writes = ring.write
    if host_writes:
        _write_layer(k_cache, v_cache, k_new, v_new, ring.write_slot)
    ring.k_new.append(k_new)
    ring.v_new.append(v_new)
    ring.layer += 1
    return o


# ------------------------------------------------------------------------------------- host side
def _check_window(window: int) -> None:
    if not 0 <= window <= MAX_WINDOW:
        raise ValueError(f"window {window} (past frames per motion layer) must be in 0..{MAX_WINDOW}: the motion "
                         f"modules were trained on {MAX_WINDOW + 1}-frame windows; ring slots = window + 1")


def alloc_ring(unet: MainUNet, slots: int, elements: int, h: int, w: int, dtype=torch.float32,
               device="cpu") -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Zeroed k/v rings for `elements` ring owners: 40 tensors (slots, elements*H_l*W_l, C_l) each.

    slots = window + 1; slots = 1 (window 0) gives (None, None): no ring memory at all. `dtype` is the
    storage dtype (the model's, or e.g. torch.float8_e4m3fn to halve the ring; read with the model's math).
    """
    _check_window(slots - 1)
    if elements < 1:
        raise ValueError(f"elements = {elements}: a ring needs at least one owner")
    if slots == 1:
        return None, None
    shapes = [(slots, elements * n, c) for n, c in motion_layout(unet, h, w)]
    return ([torch.zeros(s, dtype=dtype, device=device) for s in shapes],
            [torch.zeros(s, dtype=dtype, device=device) for s in shapes])


def _write_layer(kc: torch.Tensor, vc: torch.Tensor, kn: torch.Tensor, vn: torch.Tensor,
                 write_slot: torch.Tensor) -> None:
    """Rows of element e of kn/vn -> slot write_slot[e] of kc/vc (in place, views included)."""
    E = write_slot.shape[0]
    ws = write_slot.long() % kc.shape[0]
    e = torch.arange(E, device=kc.device)
    kc.unflatten(1, (E, -1))[ws, e] = kn.unflatten(0, (E, -1)).to(kc.dtype)
    vc.unflatten(1, (E, -1))[ws, e] = vn.unflatten(0, (E, -1)).to(vc.dtype)


def ring_write(k_cache: list, v_cache: list, k_new: list, v_new: list, write_slot: torch.Tensor) -> None:
    """Store each element's new raw K/V in its slot write_slot[e] of every layer (in place, no host sync)."""
    for kc, vc, kn, vn in zip(k_cache, v_cache, k_new, v_new, strict=True):
        _write_layer(kc, vc, kn, vn, write_slot)


def ring_advance(write_slot: torch.Tensor, n_past: torch.Tensor, slots: int,
                 active: torch.Tensor | None = None) -> None:
    """After every step of a frame: next slot, one more past frame (at most slots - 1). In place.

    active: optional (E,) bool device tensor; only those elements advance (the others keep their slot,
    which the next call overwrites, so an inactive element's computed frame is dropped)."""
    if active is None:
        write_slot.add_(1).remainder_(slots)
        n_past.add_(1).clamp_(max=slots - 1)
        return
    if active.shape != write_slot.shape or active.dtype != torch.bool:
        raise ValueError(f"active must be a bool tensor of shape {tuple(write_slot.shape)}, got "
                         f"{active.dtype} {tuple(active.shape)}")
    step = active.to(write_slot.dtype)
    write_slot.add_(step).remainder_(slots)
    n_past.add_(step).clamp_(max=slots - 1)


def ring_reset(write_slot: torch.Tensor, n_past: torch.Tensor, elements=None) -> None:
    """Zero the counters of `elements` (int, list of ints, index tensor or (E,) bool mask; None: all),
    so those elements start a new stream; their ring contents are never read again. In place."""
    if elements is None:
        write_slot.zero_()
        n_past.zero_()
    elif isinstance(elements, torch.Tensor) and elements.dtype == torch.bool:
        write_slot.masked_fill_(elements, 0)
        n_past.masked_fill_(elements, 0)
    elif isinstance(elements, torch.Tensor):
        idx = elements.to(write_slot.device, torch.long).reshape(-1)
        write_slot.index_fill_(0, idx, 0)
        n_past.index_fill_(0, idx, 0)
    else:
        for e in [elements] if isinstance(elements, int) else elements:
            if not -write_slot.shape[0] <= e < write_slot.shape[0]:
                raise IndexError(f"element {e} is out of range for {write_slot.shape[0]} elements")
            write_slot[e].zero_()  # basic indexing: a view, no host sync
            n_past[e].zero_()


def ring_bytes(unet: MainUNet, window: int, elements: int, h: int, w: int, dtype=torch.float16) -> int:
    """Exact bytes of the k and v rings of `elements` owners at `window` (what alloc_ring allocates).
    The unet may live on the meta device."""
    _check_window(window)
    if window == 0:
        return 0
    return 2 * (window + 1) * elements * sum(n * c for n, c in motion_layout(unet, h, w)) * dtype.itemsize
