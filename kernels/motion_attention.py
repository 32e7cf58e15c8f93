"""Streaming temporal (motion-module) attention for one new frame per element, with ring-buffer K/V caches.

X-Portrait's motion modules attend along the frame axis separately for every spatial position, over a
16-frame window with a sinusoidal positional encoding pe[0:16] added before the Q/K/V projections
(docs/xportrait-spec.md §5.1). A streaming runtime (§5.3, option D) runs the spatial layers for the new
frame only and lets it attend to cached K/V of the previous frames. Because to_k/to_v have no bias,

    K(frame, position p) = W_k·h_frame + W_k·pe[p],

so the cache stores the raw projections W_k·h (which never change) and the kernel adds a per-layer
table pe_k[p] = W_k·pe[p] (P = 24 rows) on the fly. When a frame ages by one step its position changes,
but nothing in the cache is rewritten.

Elements: one call serves E ring owners ("elements": a (stream, denoising-step) pair each). The R rows
are E equal blocks of R/E rows (row = e·R/E + spatial position), and `write_slot`, `n_past` are int32
device tensors of shape (E,), one pair per element, read inside the kernel, so a frame step needs no
host sync and can be replayed in a CUDA graph. Element e reads and writes only its own rows with its
own counters, so elements join, leave and reset independently.

Ring layout: k_cache/v_cache are (L, R, C): L slots (window + 1), C = heads × D, rows contiguous (row
stride C) but any slot stride, so a call may get a row-slice view of a bigger ring
(ring[:, s·R/E:(s+E)·R/E]) without a copy. For element e, frame j steps back (j = 1..n_past[e]) lives
in slot (write_slot[e] - j) mod L and has temporal position n_past[e] - j; the new frame has position
n_past[e] and its raw k/v come from k_new/v_new. With write_cache the kernel also copies k_new/v_new
into slot write_slot[e] of the element's rows (it never reads that slot, so there is no race).

Ring dtype: the caches may be stored in another dtype than q (e.g. float8_e4m3fn to halve the ring);
they are read with fp32 math. The kernel writes the ring only when it has q's dtype; otherwise the
caller writes it (models.streaming.ring_write, torch's rounding).

Per row and head the sequence is at most 16 long, so this is a memory-bound streaming kernel, not
a matmul: each program owns BLOCK_R rows of one head and loops over up to max(n_past) + 1 frames of its
rows with an online softmax (rows of elements with fewer past frames mask the extra ones), using
elementwise products and row sums in fp32 (no tl.dot, so the head dim is split into exact power-of-two
chunks: 40 = 32 + 8, 80 = 64 + 16, 160 = 128 + 32). The grid puts the head index in the fastest
dimension, so the programs sharing a cache line run at the same time.

Where it runs: torch path as ``torch.ops.xportrait.motion_attention`` (mutates k_cache/v_cache when
write_cache); TensorRT through the opt-in plugin in ``engines/plugins/``, which does not write the cache.
"""

import torch

from .reference_attention import _LOG2E, KERNEL_DTYPES, _check_kernel_available, _jit, _runnable
from .reference_attention import interpret_mode, split_head_dim

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: reference() still works, the kernel raises a clear error.
    triton = tl = None

__all__ = ["motion_attention", "reference", "RING_DTYPES"]

RING_DTYPES = (*KERNEL_DTYPES, torch.float8_e4m3fn)  # storage dtypes of k_cache/v_cache


@_jit
def _motion_attn_fwd(
    Q, KN, VN, KC, VC, PEK, PEV,  # *Pointers*: q/k_new/v_new (R,C), caches (L,R,C), pe tables (P,C)
    WS, NP,  # *Pointers* to int32 write_slot and n_past, (E,) each
    R, E, L, P,  # rows, elements (R % E == 0), ring capacity, positional-table length
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

    # Per-row counters of the row's element, clamped so bad values can never read out of bounds.
    elem = rows // (R // E)  # (BLOCK_R,)
    ws = tl.load(WS + elem, mask=r_mask, other=0)
    ws = (((ws % L) + L) % L).to(tl.int64)
    n_row = tl.load(NP + elem, mask=r_mask, other=0)
    n_row = tl.maximum(tl.minimum(n_row, tl.minimum(L - 1, P - 1)), 0)  # (BLOCK_R,)
    n_max = tl.max(n_row, 0)  # frames this program loops over

    # New frame (position n_past): its score opens the online softmax as the first max, weight 1.
    q0 = tl.load(Q + off0, mask=m0, other=0.0).to(tl.float32) * QK_SCALE
    kn0 = tl.load(KN + off0, mask=m0, other=0.0)
    vn0 = tl.load(VN + off0, mask=m0, other=0.0)
    if WRITE_CACHE:
        tl.store(KC + (ws * stride_kcl)[:, None] + off0, kn0, mask=m0)
        tl.store(VC + (ws * stride_vcl)[:, None] + off0, vn0, mask=m0)
    pe0 = n_row[:, None] * C + c0[None, :]  # (BLOCK_R, D0) offsets into the pe tables
    k0 = kn0.to(tl.float32) + tl.load(PEK + pe0, mask=m0, other=0.0).to(tl.float32)
    acc0 = vn0.to(tl.float32) + tl.load(PEV + pe0, mask=m0, other=0.0).to(tl.float32)
    s = tl.sum(q0 * k0, 1)  # (BLOCK_R,) scores in the log2 domain
    if D1 > 0:
        q1 = tl.load(Q + off1, mask=m1, other=0.0).to(tl.float32) * QK_SCALE
        kn1 = tl.load(KN + off1, mask=m1, other=0.0)
        vn1 = tl.load(VN + off1, mask=m1, other=0.0)
        if WRITE_CACHE:
            tl.store(KC + (ws * stride_kcl)[:, None] + off1, kn1, mask=m1)
            tl.store(VC + (ws * stride_vcl)[:, None] + off1, vn1, mask=m1)
        pe1 = n_row[:, None] * C + c1[None, :]
        k1 = kn1.to(tl.float32) + tl.load(PEK + pe1, mask=m1, other=0.0).to(tl.float32)
        s += tl.sum(q1 * k1, 1)
        acc1 = vn1.to(tl.float32) + tl.load(PEV + pe1, mask=m1, other=0.0).to(tl.float32)
    m_i = s
    l_i = tl.full([BLOCK_R], 1.0, dtype=tl.float32)

    for j in range(1, n_max + 1):  # past frames, newest first
        valid = r_mask & (j <= n_row)  # (BLOCK_R,) rows whose element has a frame j steps back
        slot = (ws - j + L) % L  # (BLOCK_R,) int64
        pos = tl.maximum(n_row - j, 0)
        kc = KC + (slot * stride_kcl)[:, None]  # (BLOCK_R, 1) base pointers of each row's slot
        vc = VC + (slot * stride_vcl)[:, None]
        v0_mask = valid[:, None]
        pp0 = pos[:, None] * C + c0[None, :]
        k0 = tl.load(kc + off0, mask=v0_mask, other=0.0).to(tl.float32)
        k0 += tl.load(PEK + pp0, mask=v0_mask, other=0.0).to(tl.float32)
        s = tl.sum(q0 * k0, 1)
        if D1 > 0:
            v1_mask = valid[:, None] & d1_mask[None, :]
            pp1 = pos[:, None] * C + c1[None, :]
            k1 = tl.load(kc + off1, mask=v1_mask, other=0.0).to(tl.float32)
            k1 += tl.load(PEK + pp1, mask=v1_mask, other=0.0).to(tl.float32)
            s += tl.sum(q1 * k1, 1)
        s = tl.where(valid, s, float("-inf"))  # m_i stays finite (the new frame's score), so p = 0 here
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + p
        m_i = m_new
        v0 = tl.load(vc + off0, mask=v0_mask, other=0.0).to(tl.float32)
        v0 += tl.load(PEV + pp0, mask=v0_mask, other=0.0).to(tl.float32)
        acc0 = acc0 * alpha[:, None] + p[:, None] * v0
        if D1 > 0:
            v1 = tl.load(vc + off1, mask=v1_mask, other=0.0).to(tl.float32)
            v1 += tl.load(PEV + pp1, mask=v1_mask, other=0.0).to(tl.float32)
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
    pipelined frame loop. Not yet tuned on a GPU (bench/kernels.py)."""
    d_pad = 1 << (d0 + d1 - 1).bit_length()
    return dict(BLOCK_R=max(16, 4096 // d_pad), num_warps=4, num_stages=2)


def _launch(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads: int, scale: float,
            out: torch.Tensor, write_cache: bool = True) -> torch.Tensor:
    """Launch the kernel writing into `out` (R,C) and, if write_cache, each element's ring slot.
    Asynchronous: nothing here synchronizes the stream."""
    _check_inputs(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads, write_cache)
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
    q, k_new, v_new, pe_k, pe_v, write_slot, n_past = (
        t.contiguous() for t in (q, k_new, v_new, pe_k, pe_v, write_slot, n_past))
    if R == 0:
        return out
    D = C // heads
    d0, d1 = split_head_dim(D, minimum=1)  # no tl.dot here, so chunks of any power of two are fine
    cfg = _launch_config(d0, d1)
    grid = (heads, triton.cdiv(R, cfg["BLOCK_R"]))  # heads fastest: neighbours share cache lines
    _runnable(_motion_attn_fwd)[grid](
        q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past,
        R, write_slot.numel(), k_cache.shape[0], pe_k.shape[0], k_cache.stride(0), v_cache.stride(0),
        out,
        C=C, HEAD_DIM=D, D0=d0, D1=d1, QK_SCALE=scale * _LOG2E, WRITE_CACHE=write_cache,
        INTERP_BF16=interpret_mode() and q.dtype == torch.bfloat16, **cfg,
    )
    return out


@torch.library.custom_op("xportrait::motion_attention", mutates_args=("k_cache", "v_cache"))
def _motion_attention_op(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    pe_k: torch.Tensor, pe_v: torch.Tensor, write_slot: torch.Tensor, n_past: torch.Tensor,
    heads: int, scale: float, write_cache: bool = True,
) -> torch.Tensor:
    return _launch(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads, scale,
                   q.new_empty(q.shape), write_cache)


@_motion_attention_op.register_fake
def _(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads, scale, write_cache=True):
    return q.new_empty(q.shape)


def _check_inputs(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads, write_cache=False):
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
        if t.dtype != torch.int32 or t.dim() != 1 or t.numel() < 1:
            raise TypeError(f"{name} must be an int32 tensor of shape (E,), one counter per element; "
                            f"got {t.dtype} {tuple(t.shape)}")
    E = write_slot.numel()
    if n_past.shape != write_slot.shape or R % E:
        raise ValueError(f"write_slot {tuple(write_slot.shape)} and n_past {tuple(n_past.shape)} must both be "
                         f"(E,) with E dividing the {R} rows (E equal row blocks, one per element)")
    if heads <= 0 or C % heads:
        raise ValueError(f"channels {C} are not divisible by heads {heads}")
    if len({t.dtype for t in (q, k_new, v_new, pe_k, pe_v)}) != 1:
        raise TypeError("q, k_new, v_new, pe_k, pe_v must share one dtype")
    if k_cache.dtype != v_cache.dtype or (k_cache.dtype != q.dtype and k_cache.dtype not in RING_DTYPES):
        raise TypeError(f"k_cache, v_cache must share one dtype: q's or one of {RING_DTYPES}; "
                        f"got {k_cache.dtype}, {v_cache.dtype}")
    if write_cache and k_cache.dtype != q.dtype:
        raise TypeError(f"the ring is {k_cache.dtype} and q is {q.dtype}: the kernel writes the ring only in q's "
                        "dtype; pass write_cache=False and store k_new/v_new with models.streaming.ring_write")


def motion_attention(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads: int,
                     scale: float | None = None, write_cache: bool = True) -> torch.Tensor:
    """Attention of each element's new frame over itself and its n_past cached frames, per row and head.

    q, k_new, v_new (R,C): q already includes W_q·pe[n_past]; k_new/v_new are raw (no positional term).
    R = E equal row blocks, one per element. k_cache, v_cache (L,R,C): raw ring buffers (rows contiguous,
    any slot stride: views of a bigger ring work), in q's dtype or another of RING_DTYPES.
    pe_k, pe_v (P,C): W_k·pe[p], W_v·pe[p]. write_slot, n_past: int32 (E,) device tensors,
    0 <= n_past <= min(L, P) - 1 (clamped in the kernel). write_cache: store k_new/v_new in slot
    write_slot[e] of each element's rows (needs the ring in q's dtype). Returns (R,C) in q's dtype.
    """
    _check_inputs(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads, write_cache)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"motion_attention kernel supports {KERNEL_DTYPES}, got {q.dtype}")
    _check_kernel_available(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past,
                            name="motion_attention")
    scale = (q.shape[-1] // heads) ** -0.5 if scale is None else float(scale)
    return torch.ops.xportrait.motion_attention(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v,
                                                write_slot, n_past, heads, scale, write_cache)


def reference(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads: int,
              scale: float | None = None, write_cache: bool = True) -> torch.Tensor:
    """Plain PyTorch definition, including the ring write; no host sync (usable in CUDA graphs).

    Gathers the L - 1 older slots of every element with their positions, puts the new frame first,
    masks the slots older than n_past, and runs an explicit softmax. Products run in q's dtype (the
    ring is cast to it), the softmax in at least fp32.
    """
    _check_inputs(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads)
    L, R, C = k_cache.shape
    E, D = write_slot.numel(), C // heads
    scale = D**-0.5 if scale is None else float(scale)
    ws = write_slot.long() % L  # (E,)
    e = torch.arange(E, device=q.device)
    kc, vc = k_cache.unflatten(1, (E, R // E)), v_cache.unflatten(1, (E, R // E))  # (L, E, HW, C) views
    j = torch.arange(L, device=q.device)[:, None]  # (L, 1) steps back; j = 0 is the new frame
    slots = (ws[None] - j[1:]) % L  # (L-1, E)
    n = n_past.long().clamp(0, min(L, pe_k.shape[0]) - 1)  # (E,)
    pos = (n[None] - j).clamp(min=0)  # (L, E) temporal positions; j > n_past is masked below
    k = torch.cat([k_new.reshape(1, E, R // E, C), kc[slots, e].to(q.dtype)]) + pe_k[pos][:, :, None]
    v = torch.cat([v_new.reshape(1, E, R // E, C), vc[slots, e].to(q.dtype)]) + pe_v[pos][:, :, None]
    unused = (j > n[None])[:, :, None, None]  # (L, E, 1, 1)
    v = v.masked_fill(unused, 0)  # unused slots may hold garbage (NaN * 0 = NaN)
    s = torch.einsum("ewhd,lewhd->ewhl", q.reshape(E, R // E, heads, D), k.unflatten(-1, (heads, D))) * scale
    s = s.masked_fill(unused.permute(1, 2, 3, 0), float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(s.dtype)
    out = torch.einsum("ewhl,lewhd->ewhd", p, v.unflatten(-1, (heads, D))).reshape(R, C)
    if write_cache:
        kc[ws, e] = k_new.reshape(E, R // E, C).to(kc.dtype)
        vc[ws, e] = v_new.reshape(E, R // E, C).to(vc.dtype)
    return out


def bytes_moved(rows: int, channels: int, frames: int, itemsize: int) -> float:
    """Minimum DRAM traffic of one call with `frames` = n_past + 1: read q and k/v of every frame
    (k_new/v_new for the new one), write out and the new frame's cache slot."""
    reads = 1 + 2 * frames
    writes = 1 + 2
    return float(itemsize) * rows * channels * (reads + writes)
