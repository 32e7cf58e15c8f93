"""Reference ("appearance") attention: one fused pass over the frame's own keys and the reference keys.

X-Portrait's main UNet concatenates the reference net's tokens to its own along the token axis and
runs ordinary multi-head self-attention on the result (docs/xportrait-spec.md §3.2):

    out = softmax(q · [k; k_ref]^T · scale) · [v; v_ref]        per head, scale = D**-0.5

This kernel never builds the concatenation. It streams the N own keys and then the M reference keys
through one online-softmax accumulator (flash-attention style), reading k_ref/v_ref with a batch stride
of 0 when one reference bank is shared by every frame (Br == 1). M == 0 is plain self-attention, which
is what the unconditional CFG branch needs (§3.4: dropping the reference tokens is not the same as
zeroing them).

Layout: q, k, v are the raw outputs of the to_q/to_k/to_v Linear layers, (B, N, C) with the heads packed
in the channel dim (head h owns channels h*D:(h+1)*D), so no transposes or copies are needed.

Head dims: SD1.5 uses D = 40, 80, 160. tl.dot wants power-of-two tiles of at least 16, so D is split
into two power-of-two chunks, D0 = largest power of two <= D and D1 = the remainder rounded up to a
power of two (>= 16): 160 = 128 + 32 and 80 = 64 + 16 are exact, 40 = 32 + 16 wastes 8 of 48 lanes
(next-power-of-two padding would waste 24 of 64, 48 of 128 and 96 of 256). Each chunk gets its own
dot, so QK^T = Q0·K0^T + Q1·K1^T and the output accumulator is kept as two tiles.

Where it runs: on the torch path, as the custom op ``torch.ops.xportrait.reference_attention`` (opaque
to torch.compile, capturable in CUDA graphs). TensorRT engines see it only through the plugin in
``engines/plugins/`` (opt-in). ``reference()`` below is the plain-PyTorch definition; tests and the
benchmark import it from here.
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: reference() still works, the kernel raises a clear error.
    triton = tl = None

__all__ = ["reference_attention", "reference", "split_head_dim"]

_LOG2E = 1.4426950408889634  # 1 / ln(2)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _ref_attn_fwd(
    Q, K, V, KR, VR,  # *Pointers* to q (B,N,C), k/v (B,NK,C), k_ref/v_ref (Br,M,C); channel stride 1
    N, NK, M,  # query count, own key count, reference key count
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn,  # element strides
    stride_krb, stride_krn, stride_vrb, stride_vrn,  # stride_*rb == 0 broadcasts one bank to all frames
    stride_ob, stride_on,
    Out,  # *Pointer* to the output (B,N,C)
    HEADS: tl.constexpr,  # number of heads packed in C
    HEAD_DIM: tl.constexpr,  # D = C // HEADS
    D0: tl.constexpr, D1: tl.constexpr,  # power-of-two chunks covering D (D1 == 0: one chunk)
    QK_SCALE: tl.constexpr,  # softmax scale * log2(e), so exp2 can be used
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), "tf32" (ignored) for fp16/bf16
    INTERP_BF16: tl.constexpr,  # bf16 under the CPU interpreter: work around its bf16 dot and cast (below)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    m_mask = offs_m < N
    c0 = h * HEAD_DIM + tl.arange(0, D0)  # (D0,) channels of chunk 0
    d0_mask = tl.arange(0, D0) < HEAD_DIM  # all true unless D < 16 (chunk 0 padded up to a tl.dot tile)

    q_rows = Q + b * stride_qb + offs_m[:, None] * stride_qn
    q0 = tl.load(q_rows + c0[None, :], mask=m_mask[:, None] & d0_mask[None, :], other=0.0)  # (BLOCK_M, D0)
    if INTERP_BF16:  # the interpreter's bf16 tl.dot multiplies raw uint16 storage
        q0 = q0.to(tl.float32)
    if D1 > 0:
        d1_mask = tl.arange(0, D1) < HEAD_DIM - D0
        c1 = h * HEAD_DIM + D0 + tl.arange(0, D1)  # (D1,) channels of chunk 1, tail masked
        q1 = tl.load(q_rows + c1[None, :], mask=m_mask[:, None] & d1_mask[None, :], other=0.0)
        if INTERP_BF16:
            q1 = q1.to(tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running denominator
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)

    # Segment 0: the frame's own keys; segment 1: the reference keys. Unrolled at compile time.
    for seg in tl.static_range(2):
        if seg == 0:
            k_base = K + b * stride_kb
            v_base = V + b * stride_vb
            skn = stride_kn
            svn = stride_vn
            n_keys = NK
        else:
            k_base = KR + b * stride_krb
            v_base = VR + b * stride_vrb
            skn = stride_krn
            svn = stride_vrn
            n_keys = M
        for start in range(0, n_keys, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key rows
            n_mask = offs_n < n_keys
            k_rows = k_base + offs_n[:, None] * skn
            v_rows = v_base + offs_n[:, None] * svn

            k0 = tl.load(k_rows + c0[None, :], mask=n_mask[:, None] & d0_mask[None, :], other=0.0)  # (BLOCK_N, D0)
            if INTERP_BF16:
                k0 = k0.to(tl.float32)
            qk = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) fp32
            if D1 > 0:
                k1 = tl.load(k_rows + c1[None, :], mask=n_mask[:, None] & d1_mask[None, :], other=0.0)
                if INTERP_BF16:
                    k1 = k1.to(tl.float32)
                qk = tl.dot(q1, tl.trans(k1), qk, input_precision=PRECISION)
            qk = tl.where(n_mask[None, :], qk, float("-inf"))

            # Online softmax: every tile holds at least one valid key, so m_new is finite. The scale is
            # applied to the row max only and folded into one multiply-add per score (qk*s - m), not a
            # separate multiply of the whole tile (scale > 0 commutes with the max).
            m_new = tl.maximum(m_i, tl.max(qk, 1) * QK_SCALE)
            alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
            p = tl.exp2(qk * QK_SCALE - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new

            v0 = tl.load(v_rows + c0[None, :], mask=n_mask[:, None] & d0_mask[None, :], other=0.0)  # (BLOCK_N, D0)
            p_lo = p.to(v0.dtype)  # P·V in the input precision, fp32 accumulation
            if INTERP_BF16:
                p_lo = p_lo.to(tl.float32)
                v0 = v0.to(tl.float32)
            acc0 = tl.dot(p_lo, v0, acc0 * alpha[:, None], input_precision=PRECISION)
            if D1 > 0:
                v1 = tl.load(v_rows + c1[None, :], mask=n_mask[:, None] & d1_mask[None, :], other=0.0)
                if INTERP_BF16:
                    v1 = v1.to(tl.float32)
                acc1 = tl.dot(p_lo, v1, acc1 * alpha[:, None], input_precision=PRECISION)

    inv_l = 1.0 / l_i
    o_rows = Out + b * stride_ob + offs_m[:, None] * stride_on
    o0 = acc0 * inv_l[:, None]
    if INTERP_BF16:  # the interpreter's fp32->bf16 cast truncates: add the round-to-nearest-even carry
        bits = o0.to(tl.uint32, bitcast=True)
        o0 = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
    tl.store(o_rows + c0[None, :], o0.to(Out.dtype.element_ty), mask=m_mask[:, None] & d0_mask[None, :])
    if D1 > 0:
        o1 = acc1 * inv_l[:, None]
        if INTERP_BF16:
            bits = o1.to(tl.uint32, bitcast=True)
            o1 = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
        tl.store(o_rows + c1[None, :], o1.to(Out.dtype.element_ty), mask=m_mask[:, None] & d1_mask[None, :])


def split_head_dim(d: int, minimum: int = 16) -> tuple[int, int]:
    """Cover head dim d with two power-of-two chunks (d0, d1), each >= minimum (d1 == 0: one chunk).

    40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32), 64 -> (64, 0), 8 -> (16, 0).
    """
    d0 = max(minimum, 1 << (d.bit_length() - 1))
    rest = d - d0
    return d0, (0 if rest <= 0 else max(minimum, _next_pow2(rest)))


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def smem_estimate(cfg: dict, d_pad: int, elt: int = 2) -> int:
    """Bytes of shared memory a config needs, by the model the configs below were sized with: the Q tile
    plus num_stages buffered K and V tiles (BLOCK_N x d_pad each)."""
    return cfg["BLOCK_M"] * d_pad * elt + 2 * cfg["num_stages"] * cfg["BLOCK_N"] * d_pad * elt


LARGE_SMEM = 160 * 1024  # A100 (163 KB opt-in) and Hopper (227 KB) have this much per block; consumer GPUs 99 KB


def _device_smem(device: torch.device | None) -> int | None:
    """Opt-in shared memory per block of a CUDA device (None on the CPU or where torch does not say)."""
    if device is None or device.type != "cuda":
        return None
    return _smem_of(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=16)
def _smem_of(index: int) -> int | None:  # host-side property, read once per device (no sync per launch)
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)


def _launch_config(n: int, d0: int, d1: int, fp32: bool = False, smem: int | None = None) -> dict:
    """Tiles and warps per head-dim class: large tiles that ptxas compiles without spills for sm_90 and
    that fit in 99 KB of shared memory (fp16/bf16). Not yet tuned on a GPU (bench/kernels.py --sweep).
    With `smem` >= LARGE_SMEM (A100, H100/H200), D=160 gets the 128x64 tile that 99 KB rules out
    (120 KB by smem_estimate; a prediction, docs/bench.md). fp32 (IEEE dots, a validation path) uses
    small tiles and still spills a little at D=160."""
    d_pad = d0 + d1
    if fp32:
        block_m, block_n, num_warps, num_stages = 32, 32, 4, 2
    elif d_pad <= 64:
        block_m, block_n, num_warps, num_stages = 128, 64, 4, 3
    elif d_pad <= 128:
        block_m, block_n, num_warps, num_stages = 128, 64, 8, 3
    elif smem is not None and smem >= LARGE_SMEM:  # D=160 where shared memory allows the larger tile
        block_m, block_n, num_warps, num_stages = 128, 64, 8, 2
    else:  # D=160: BLOCK_N=64 would need 100 KB of shared memory, over the 99 KB of consumer GPUs
        block_m, block_n, num_warps, num_stages = 64, 32, 8, 2
    block_m = min(block_m, max(16, _next_pow2(n)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter (tests, debugging)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_interprets() -> bool:
    """Whether Triton was imported in interpreter mode. Triton reads TRITON_INTERPRET once, when it
    is first imported (its own library functions, such as tl.sum, are decorated then)."""
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.standard.sum, JITFunction)


def _runnable(kernel):
    """The kernel, after checking that Triton's import-time mode matches TRITON_INTERPRET."""
    if interpret_mode() and not triton_interprets():
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after Triton had been imported, so Triton cannot interpret this kernel. "
            "Set it before the first `import triton` (in the environment, or at the top of tests/conftest.py)."
        )
    return kernel


def _check_kernel_available(*tensors: torch.Tensor, name: str) -> None:
    if triton is None:
        raise RuntimeError(f"{name}: Triton is not installed; call {name}.reference() instead.")
    if not all(t.is_cuda for t in tensors) and not interpret_mode():
        raise RuntimeError(
            f"{name}: the Triton kernel needs CUDA tensors (got {tensors[0].device}). On CPU call "
            f"kernels.{name}.reference() instead, or set TRITON_INTERPRET=1 to run the kernel in Triton's "
            "interpreter (slow, for tests)."
        )


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, v, k_ref, v_ref, heads: int, scale: float, out: torch.Tensor, config: dict | None = None
            ) -> torch.Tensor:
    """Launch the kernel writing into `out` (B,N,C). Asynchronous: `out` is still being computed on
    return, since nothing here synchronizes the stream. `config` (BLOCK_M, BLOCK_N, num_warps,
    num_stages) overrides the heuristic, for bench/kernels.py --sweep and tests."""
    _check_inputs(q, k, v, k_ref, v_ref, heads)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"reference_attention kernel supports {KERNEL_DTYPES}, got {q.dtype}")
    _check_kernel_available(q, k, v, k_ref, v_ref, out, name="reference_attention")
    q, k, v, k_ref, v_ref = map(_lastdim_contiguous, (q, k, v, k_ref, v_ref))
    B, N, C = q.shape
    if out.numel() == 0:
        return out
    D = C // heads
    d0, d1 = split_head_dim(D)
    cfg = config or _launch_config(N, d0, d1, fp32=q.dtype == torch.float32, smem=_device_smem(q.device))
    ref_b = 0 if k_ref.shape[0] == 1 else 1  # batch stride 0 broadcasts one reference bank, no copy
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * heads)
    _runnable(_ref_attn_fwd)[grid](
        q, k, v, k_ref, v_ref,
        N, k.shape[1], k_ref.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_ref.stride(0) * ref_b, k_ref.stride(1), v_ref.stride(0) * ref_b, v_ref.stride(1),
        out.stride(0), out.stride(1),
        out,
        HEADS=heads, HEAD_DIM=D, D0=d0, D1=d1, QK_SCALE=scale * _LOG2E,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERP_BF16=interpret_mode() and q.dtype == torch.bfloat16,
        **cfg,
    )
    return out


@torch.library.custom_op("xportrait::reference_attention", mutates_args=())
def _reference_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor,
    heads: int, scale: float,
) -> torch.Tensor:
    return _launch(q, k, v, k_ref, v_ref, heads, scale, q.new_empty(q.shape))


@_reference_attention_op.register_fake
def _(q, k, v, k_ref, v_ref, heads, scale):
    return q.new_empty(q.shape)


def _check_inputs(q, k, v, k_ref, v_ref, heads):
    if q.dim() != 3 or k.dim() != 3 or k_ref.dim() != 3:
        raise ValueError(f"expected (B, N, C) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"k_ref {tuple(k_ref.shape)}")
    B, N, C = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != C:
        raise ValueError(f"k and v must be (B, NK, C) = ({B}, NK, {C}); got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_ref.shape != v_ref.shape or k_ref.shape[0] not in (1, B) or k_ref.shape[2] != C:
        raise ValueError(f"k_ref and v_ref must be (1 or {B}, M, {C}); "
                         f"got {tuple(k_ref.shape)} and {tuple(v_ref.shape)}")
    if heads <= 0 or C % heads:
        raise ValueError(f"channels {C} are not divisible by heads {heads}")
    if len({t.dtype for t in (q, k, v, k_ref, v_ref)}) != 1:
        raise TypeError("q, k, v, k_ref, v_ref must share one dtype")


def reference_attention(q, k, v, k_ref, v_ref, heads: int, scale: float | None = None) -> torch.Tensor:
    """Fused softmax(q·[k;k_ref]^T·scale)·[v;v_ref] per head.

    q (B,N,C); k, v (B,NK,C) (normally NK == N); k_ref, v_ref (Br,M,C) with Br in {1, B}, M >= 0.
    Heads are packed in C (head h = channels h*D:(h+1)*D). Returns (B,N,C) in q's dtype.
    Runs the Triton kernel on CUDA tensors (or on CPU under TRITON_INTERPRET=1); raises otherwise.
    """
    _check_inputs(q, k, v, k_ref, v_ref, heads)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"reference_attention kernel supports {KERNEL_DTYPES}, got {q.dtype}")
    _check_kernel_available(q, k, v, k_ref, v_ref, name="reference_attention")
    scale = (q.shape[-1] // heads) ** -0.5 if scale is None else float(scale)
    return torch.ops.xportrait.reference_attention(q, k, v, k_ref, v_ref, heads, scale)


def reference(q, k, v, k_ref, v_ref, heads: int, scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch definition: explicit concatenation, scores, softmax, weighted sum.

    Matmuls run in the input dtype; the softmax runs in at least fp32 (like SDPA/xformers) and its
    result is rounded back to the input dtype before P·V.
    """
    _check_inputs(q, k, v, k_ref, v_ref, heads)
    B, N, C = q.shape
    D = C // heads
    scale = D**-0.5 if scale is None else float(scale)
    kk = torch.cat([k, k_ref.expand(B, -1, -1)], dim=1)  # (B, NK+M, C)
    vv = torch.cat([v, v_ref.expand(B, -1, -1)], dim=1)

    def split(t):  # (B, T, C) -> (B, heads, T, D)
        return t.reshape(B, t.shape[1], heads, D).transpose(1, 2)

    s = (split(q) @ split(kk).transpose(-1, -2)) * scale  # (B, heads, N, NK+M)
    p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(s.dtype)
    return (p @ split(vv)).transpose(1, 2).reshape(B, N, C)


def flops(batch: int, n: int, nk: int, m: int, channels: int) -> float:
    """Matmul FLOPs of one call (2 per MAC): QK^T and P·V over NK+M keys."""
    return 4.0 * batch * n * (nk + m) * channels

