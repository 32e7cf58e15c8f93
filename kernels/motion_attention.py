"""Streaming temporal (motion-module) attention for one new frame, with a ring-buffer K/V cache.

X-Portrait's motion modules attend along the frame axis separately for every spatial position, over a
16-frame window with a sinusoidal positional encoding pe[0:16] added before the Q/K/V projections
(docs/xportrait-spec.md §5.1). A streaming runtime (§5.3, option D) runs the spatial layers for the new
frame only and lets it attend to cached K/V of the previous frames. Because to_k/to_v have no bias,

    K(frame, position p) = W_k·h_frame + W_k·pe[p],

so the cache stores the raw projections W_k·h (which never change) and the kernel adds a per-layer
table pe_k[p] = W_k·pe[p] (P = 24 rows) on the fly. When a frame ages by one step its position changes,
but nothing in the cache is rewritten.

Ring layout: k_cache/v_cache are (L, R, C), L slots (16: 15 past frames + the slot being written),
R = streams × spatial positions, C = heads × D. `write_slot` and `n_past` are int32 device tensors of
shape (1,), read inside the kernel, so a frame step needs no host sync and can be replayed in a CUDA
graph. Frame j steps back (j = 1..n_past) lives in slot (write_slot - j) mod L and has temporal
position n_past - j; the new frame has position n_past and its raw k/v come from k_new/v_new. The
kernel also copies k_new/v_new into slot write_slot (it never reads that slot, so there is no race).

Per row and head the sequence is at most L = 16 long, so this is a memory-bound streaming kernel, not
a matmul: each program owns BLOCK_R rows of one head and loops over the n_past + 1 frames with an
online softmax, using elementwise products and row sums in fp32 (no tl.dot, so the head dim is split
into exact power-of-two chunks: 40 = 32 + 8, 80 = 64 + 16, 160 = 128 + 32). The grid puts the head
index in the fastest dimension, so the programs sharing a cache line run at the same time.

Where it runs: torch path as ``torch.ops.xportrait.motion_attention`` (mutates k_cache/v_cache);
TensorRT through the opt-in plugin in ``engines/plugins/``, which does not write the cache.
"""

import torch

from .reference_attention import _LOG2E, KERNEL_DTYPES, _check_kernel_available, _jit, _runnable
from .reference_attention import interpret_mode, split_head_dim

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: reference() still works, the kernel raises a clear error.
    triton = tl = None

__all__ = ["motion_attention", "reference"]


@_jit
def _motion_attn_fwd(
    Q, KN, VN, KC, VC, PEK, PEV,  # *Pointers*: q/k_new/v_new (R,C), caches (L,R,C), pe tables (P,C)
    WS, NP,  # *Pointers* to int32 write_slot and n_past (one element each)
    R, L, P,  # rows, ring capacity, positional-table length
    stride_kcl, stride_vcl,  # slot strides (elements) of the caches
    Out,  # *Pointer* to the output (R,C)
    C: tl.constexpr,  # channels = the row stride of every (.., R, C) / (P, C) operand (contiguous rows)
    HEAD_DIM: tl.constexpr,  # D = C // heads
    D0: tl.constexpr, D1: tl.constexpr,  # power-of-two chunks covering D (D1 == 0: one chunk)
    QK_SCALE: tl.constexpr,  # softmax scale * log2(e)
    BLOCK_R: tl.constexpr,  # rows per program
    WRITE_CACHE: tl.constexpr,  # copy k_new/v_new into slot write_slot (torch path; not in TensorRT)
    INTERP_BF16: tl.constexpr,  # bf16 under the CPU interpreter, whose fp32->bf16 cast truncates
):
    h = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    r_mask = rows < R
    # One int32 offset tile per chunk serves every operand (same row stride C; R*C < 2**31, checked
    # by the launcher); only the slot offsets need int64.
    c0 = h * HEAD_DIM + tl.arange(0, D0)  # (D0,) channels of chunk 0
    off0 = rows[:, None] * C + c0[None, :]  # (BLOCK_R, D0)
    m0 = r_mask[:, None]
    if D1 > 0:
        d1_mask = tl.arange(0, D1) < HEAD_DIM - D0
        c1 = h * HEAD_DIM + D0 + tl.arange(0, D1)  # (D1,) channels of chunk 1
        off1 = rows[:, None] * C + c1[None, :]
        m1 = r_mask[:, None] & d1_mask[None, :]

    # Clamp the device-side counters so bad values can never read out of bounds.
    ws = (((tl.load(WS) % L) + L) % L).to(tl.int64)
    n_past = tl.maximum(tl.minimum(tl.load(NP), tl.minimum(L - 1, P - 1)), 0)

    # New frame (position n_past): its score opens the online softmax as the first max, weight 1.
    q0 = tl.load(Q + off0, mask=m0, other=0.0).to(tl.float32) * QK_SCALE
    kn0 = tl.load(KN + off0, mask=m0, other=0.0)
    vn0 = tl.load(VN + off0, mask=m0, other=0.0)
    if WRITE_CACHE:
        tl.store(KC + ws * stride_kcl + off0, kn0, mask=m0)
        tl.store(VC + ws * stride_vcl + off0, vn0, mask=m0)
    k0 = kn0.to(tl.float32) + tl.load(PEK + n_past * C + c0).to(tl.float32)[None, :]
    acc0 = vn0.to(tl.float32) + tl.load(PEV + n_past * C + c0).to(tl.float32)[None, :]
    s = tl.sum(q0 * k0, 1)  # (BLOCK_R,) scores in the log2 domain
    if D1 > 0:
        q1 = tl.load(Q + off1, mask=m1, other=0.0).to(tl.float32) * QK_SCALE
        kn1 = tl.load(KN + off1, mask=m1, other=0.0)
        vn1 = tl.load(VN + off1, mask=m1, other=0.0)
        if WRITE_CACHE:
            tl.store(KC + ws * stride_kcl + off1, kn1, mask=m1)
            tl.store(VC + ws * stride_vcl + off1, vn1, mask=m1)
        pk1 = tl.load(PEK + n_past * C + c1, mask=d1_mask, other=0.0).to(tl.float32)
        pv1 = tl.load(PEV + n_past * C + c1, mask=d1_mask, other=0.0).to(tl.float32)
        s += tl.sum(q1 * (kn1.to(tl.float32) + pk1[None, :]), 1)
        acc1 = vn1.to(tl.float32) + pv1[None, :]
    m_i = s
    l_i = tl.full([BLOCK_R], 1.0, dtype=tl.float32)

    for j in range(1, n_past + 1):  # past frames, newest first
        slot = (ws - j + L) % L
        pos = n_past - j
        kc = KC + slot * stride_kcl  # scalar base pointers of this slot
        vc = VC + slot * stride_vcl
        k0 = tl.load(kc + off0, mask=m0, other=0.0).to(tl.float32)
        k0 += tl.load(PEK + pos * C + c0).to(tl.float32)[None, :]
        s = tl.sum(q0 * k0, 1)
        if D1 > 0:
            k1 = tl.load(kc + off1, mask=m1, other=0.0).to(tl.float32)
            k1 += tl.load(PEK + pos * C + c1, mask=d1_mask, other=0.0).to(tl.float32)[None, :]
            s += tl.sum(q1 * k1, 1)
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + p
        m_i = m_new
        v0 = tl.load(vc + off0, mask=m0, other=0.0).to(tl.float32)
        v0 += tl.load(PEV + pos * C + c0).to(tl.float32)[None, :]
        acc0 = acc0 * alpha[:, None] + p[:, None] * v0
        if D1 > 0:
            v1 = tl.load(vc + off1, mask=m1, other=0.0).to(tl.float32)
            v1 += tl.load(PEV + pos * C + c1, mask=d1_mask, other=0.0).to(tl.float32)[None, :]
            acc1 = acc1 * alpha[:, None] + p[:, None] * v1

    inv_l = 1.0 / l_i
    o0 = acc0 * inv_l[:, None]
    if INTERP_BF16:  # add the round-to-nearest-even carry so the truncating cast rounds correctly
        bits = o0.to(tl.uint32, bitcast=True)
        o0 = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
    tl.store(Out + off0, o0.to(Out.dtype.element_ty), mask=m0)
    if D1 > 0:
        o1 = acc1 * inv_l[:, None]
        if INTERP_BF16:
            bits = o1.to(tl.uint32, bitcast=True)
            o1 = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
        tl.store(Out + off1, o1.to(Out.dtype.element_ty), mask=m1)


def _launch_config(d0: int, d1: int) -> dict:
    """BLOCK_R x D tiles of 2-3K elements (D = 40/80/160 -> 64/32/16 rows), 4 warps, a 2-stage
    pipelined frame loop: 95 registers and no spills in ptxas for sm_90. Not yet tuned on a GPU
    (bench/kernels.py)."""
    d_pad = 1 << (d0 + d1 - 1).bit_length()
    return dict(BLOCK_R=max(16, 4096 // d_pad), num_warps=4, num_stages=2)


def _launch(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads: int, scale: float,
            out: torch.Tensor, write_cache: bool = True) -> torch.Tensor:
    """Launch the kernel writing into `out` (R,C) and, if write_cache, the ring slot. Asynchronous:
    nothing here synchronizes the stream."""
    _check_inputs(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"motion_attention kernel supports {KERNEL_DTYPES}, got {q.dtype}")
    _check_kernel_available(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, out,
                            name="motion_attention")
    R, C = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.stride()[-2:] != (C, 1):  # written in place: cannot be copied to fix the layout
            raise ValueError(f"motion_attention: {name} needs contiguous rows, strides (.., {C}, 1); got {t.stride()}")
    if R * C >= 2**31:
        raise ValueError(f"motion_attention: R*C = {R * C} elements per slot exceed int32 offsets; split the rows")
    q, k_new, v_new, pe_k, pe_v = (t.contiguous() for t in (q, k_new, v_new, pe_k, pe_v))
    if R == 0:
        return out
    D = C // heads
    d0, d1 = split_head_dim(D, minimum=1)  # no tl.dot here, so chunks of any power of two are fine
    cfg = _launch_config(d0, d1)
    grid = (heads, triton.cdiv(R, cfg["BLOCK_R"]))  # heads fastest: neighbours share cache lines
    _runnable(_motion_attn_fwd)[grid](
        q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past,
        R, k_cache.shape[0], pe_k.shape[0], k_cache.stride(0), v_cache.stride(0),
        out,
        C=C, HEAD_DIM=D, D0=d0, D1=d1, QK_SCALE=scale * _LOG2E, WRITE_CACHE=write_cache,
        INTERP_BF16=interpret_mode() and q.dtype == torch.bfloat16, **cfg,
    )
    return out


@torch.library.custom_op("xportrait::motion_attention", mutates_args=("k_cache", "v_cache"))
def _motion_attention_op(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    pe_k: torch.Tensor, pe_v: torch.Tensor, write_slot: torch.Tensor, n_past: torch.Tensor,
    heads: int, scale: float,
) -> torch.Tensor:
    return _launch(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads, scale,
                   q.new_empty(q.shape))


@_motion_attention_op.register_fake
def _(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads, scale):
    return q.new_empty(q.shape)


def _check_inputs(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads):
    if q.dim() != 2 or q.shape != k_new.shape or q.shape != v_new.shape:
        raise ValueError(f"q, k_new, v_new must be (R, C) of one shape; "
                         f"got {tuple(q.shape)}, {tuple(k_new.shape)}, {tuple(v_new.shape)}")
    R, C = q.shape
    if k_cache.dim() != 3 or k_cache.shape[1:] != (R, C) or v_cache.shape != k_cache.shape or not k_cache.shape[0]:
        raise ValueError(f"k_cache, v_cache must be (L, {R}, {C}); "
                         f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if pe_k.dim() != 2 or pe_k.shape[1] != C or pe_v.shape != pe_k.shape or pe_k.shape[0] < 1:
        raise ValueError(f"pe_k, pe_v must be (P, {C}); got {tuple(pe_k.shape)}, {tuple(pe_v.shape)}")
    for name, t in (("write_slot", write_slot), ("n_past", n_past)):
        if t.dtype != torch.int32 or t.numel() != 1:
            raise TypeError(f"{name} must be an int32 tensor of shape (1,), got {t.dtype} {tuple(t.shape)}")
    if heads <= 0 or C % heads:
        raise ValueError(f"channels {C} are not divisible by heads {heads}")
    if len({t.dtype for t in (q, k_new, v_new, k_cache, v_cache, pe_k, pe_v)}) != 1:
        raise TypeError("q, k_new, v_new, k_cache, v_cache, pe_k, pe_v must share one dtype")


def motion_attention(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads: int,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of the new frame over itself and n_past cached frames, per row and head.

    q, k_new, v_new (R,C): q already includes W_q·pe[n_past]; k_new/v_new are raw (no positional term).
    k_cache, v_cache (L,R,C): raw ring buffers, written in place at slot write_slot.
    pe_k, pe_v (P,C): W_k·pe[p], W_v·pe[p]. write_slot, n_past: int32 (1,) device tensors,
    0 <= n_past <= min(L, P) - 1 (clamped in the kernel). Returns (R,C) in q's dtype.
    The caches need contiguous rows (strides (.., C, 1)); the other operands are copied if they lack them.
    """
    _check_inputs(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"motion_attention kernel supports {KERNEL_DTYPES}, got {q.dtype}")
    _check_kernel_available(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past,
                            name="motion_attention")
    scale = (q.shape[-1] // heads) ** -0.5 if scale is None else float(scale)
    return torch.ops.xportrait.motion_attention(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v,
                                                write_slot, n_past, heads, scale)


def reference(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads: int,
              scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch definition, including the ring write; no host sync (usable in CUDA graphs).

    Gathers all L slots with their positions, masks the ones older than n_past, and runs an explicit
    softmax. Products run in the input dtype, the softmax in at least fp32.
    """
    _check_inputs(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads)
    L, R, C = k_cache.shape
    D = C // heads
    scale = D**-0.5 if scale is None else float(scale)
    ws = write_slot.reshape(1).long() % L
    k_cache.index_copy_(0, ws, k_new[None])
    v_cache.index_copy_(0, ws, v_new[None])

    j = torch.arange(L, device=q.device)  # steps back; j = 0 is the new frame
    slots = (ws - j) % L  # (L,)
    n = n_past.reshape(1).long().clamp(0, min(L, pe_k.shape[0]) - 1)
    pos = (n - j).clamp(min=0)  # temporal positions; j > n_past are masked below
    k = (k_cache[slots] + pe_k[pos][:, None]).reshape(L, R, heads, D)  # (L, R, heads, D)
    v = (v_cache[slots] + pe_v[pos][:, None]).reshape(L, R, heads, D)
    v = v.masked_fill((j > n)[:, None, None, None], 0)  # unused slots may hold garbage (NaN * 0 = NaN)
    s = torch.einsum("rhd,lrhd->rhl", q.reshape(R, heads, D), k) * scale  # (R, heads, L)
    s = s.masked_fill(j > n, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(s.dtype)
    return torch.einsum("rhl,lrhd->rhd", p, v).reshape(R, C)


def bytes_moved(rows: int, channels: int, frames: int, itemsize: int) -> float:
    """Minimum DRAM traffic of one call with `frames` = n_past + 1: read q and k/v of every frame
    (k_new/v_new for the new one), write out and the new frame's cache slot."""
    reads = 1 + 2 * frames
    writes = 1 + 2
    return float(itemsize) * rows * channels * (reads + writes)
