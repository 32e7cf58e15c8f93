"""TensorRT quickly-deployable plugins (QDP) for the two Triton attention kernels in kernels/.

Plugins (namespace "xportrait", TensorRT >= 10.7 `tensorrt.plugin`):

* ``xportrait::reference_attention``: inputs q, k, v (B,N,C) / (B,NK,C), k_ref, v_ref (Br,M,C);
  attributes heads (int), scale (float); output (B,N,C) like q.
* ``xportrait::motion_attention``: inputs q, k_new, v_new (R,C), k_cache, v_cache (L,R,C), pe_k, pe_v
  (P,C), write_slot, n_past (int32, (E,): one pair per element, R = E equal row blocks); attributes
  heads, scale; output (R,C) like q. The plugin does NOT write the ring buffer (TensorRT treats inputs
  as read-only): the host stores the engine's k_new/v_new rows of element e into slot write_slot[e]
  (models.streaming.ring_write) after the call, or before it, since the kernel never reads that slot.
  TensorRT hands the plugin contiguous tensors, so the slot stride is R*C here.

Each plugin has an AOT implementation (the Triton kernel compiled to PTX at build time and embedded in
the engine; no Python at run time) and a JIT implementation (a Python callback launching the same
kernel through torch; handy for debugging, needs Python and torch at run time). TensorRT passes AOT
kernel arguments as (input pointers..., extra int32 scalars..., output pointers...), which is why the
kernels declare their parameters in that order. Attributes are not serialized with an AOT plugin:
heads and scale are compiled into the PTX as constants.

ONNX: a node with op_type "reference_attention" or "motion_attention", attributes heads, scale,
plugin_namespace="xportrait" and aot=1 is mapped to these plugins by TensorRT's ONNX parser.

(The decorated functions keep real annotations, not strings: tensorrt.plugin checks them.)
Nothing is imported from TensorRT until register() runs. The PTX helpers (compile_*) need only Triton
and work on a machine without a GPU, which is how they are tested.
"""

import torch

from kernels import motion_attention as ma
from kernels import reference_attention as ra

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_registered = False


class PluginsUnavailable(ImportError):
    """TensorRT's Python plugin API (tensorrt.plugin) cannot be imported."""


def _jit_function(kernel):
    """The JITFunction behind a kernel, even if it was decorated under TRITON_INTERPRET=1."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _compile(kernel, pointers: dict, constexprs: dict, num_warps: int, num_stages: int, aligned=(), target=None):
    """Compile `kernel` with every non-pointer, non-constexpr parameter as i32 (TensorRT's SymInt32).

    aligned: parameters promised to be multiples of 16 (elements for ints, bytes for pointers), which
    lets Triton vectorize loads as its JIT does when it sees such values. target: a
    triton.backends.compiler.GPUTarget; None compiles for the current GPU.
    """
    import triton

    fn = _jit_function(kernel)
    signature = {name: pointers.get(name, "i32") for name in fn.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{md.name} needs Triton scratch memory, which a TensorRT AOT plugin cannot provide")
    return compiled


def compile_reference_attention(dtype: torch.dtype, heads: int, channels: int, scale: float,
                                tokens_hint: int = 4096, target=None):
    """(compiled kernel, launch config) for xportrait::reference_attention; PTX in compiled.asm["ptx"].

    Assumes contiguous (.., T, C) tensors, as TensorRT hands them to plugins."""
    d = channels // heads
    d0, d1 = ra.split_head_dim(d)
    cfg = ra._launch_config(tokens_hint, d0, d1, fp32=dtype == torch.float32)
    ty = "*" + _TRITON_DTYPES[dtype]
    pointers = {name: ty for name in ("Q", "K", "V", "KR", "VR", "Out")}
    # All strides are 0, C or a multiple of C; buffers are 256-byte aligned.
    aligned = [*pointers, *(n for n in _jit_function(ra._ref_attn_fwd).arg_names if n.startswith("stride_"))]
    compiled = _compile(
        ra._ref_attn_fwd, pointers,
        dict(HEADS=heads, HEAD_DIM=d, D0=d0, D1=d1, QK_SCALE=scale * ra._LOG2E, BLOCK_M=cfg["BLOCK_M"],
             BLOCK_N=cfg["BLOCK_N"], PRECISION="ieee" if dtype == torch.float32 else "tf32", INTERP_BF16=False),
        cfg["num_warps"], cfg["num_stages"], aligned if channels % 16 == 0 else (), target)
    return compiled, cfg


def compile_motion_attention(dtype: torch.dtype, heads: int, channels: int, scale: float, target=None):
    """(compiled kernel, launch config) for xportrait::motion_attention, without the ring write."""
    d = channels // heads
    d0, d1 = ra.split_head_dim(d, minimum=1)
    cfg = ma._launch_config(d0, d1)
    ty = "*" + _TRITON_DTYPES[dtype]
    pointers = {name: ty for name in ("Q", "KN", "VN", "KC", "VC", "PEK", "PEV", "Out")}
    pointers.update(WS="*i32", NP="*i32")
    aligned = [*pointers, "stride_kcl", "stride_vcl"]  # slot strides are R*C
    compiled = _compile(
        ma._motion_attn_fwd, pointers,
        dict(C=channels, HEAD_DIM=d, D0=d0, D1=d1, QK_SCALE=scale * ra._LOG2E, BLOCK_R=cfg["BLOCK_R"],
             WRITE_CACHE=False, INTERP_BF16=False),
        cfg["num_warps"], cfg["num_stages"], aligned if channels % 16 == 0 else (), target)
    return compiled, cfg


def plugins_available() -> bool:
    try:
        import tensorrt.plugin  # noqa: F401
    except ImportError:
        return False
    return True


def register() -> None:
    """Register both plugins with TensorRT's plugin registry (idempotent). Opt-in: call it before
    building or deserializing an engine that uses them."""
    global _registered
    if _registered:
        return
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise PluginsUnavailable(
            f"TensorRT's Python plugin API is missing ({e}). The xportrait plugins need full TensorRT >= 10.7 "
            "(pip install tensorrt); TensorRT-RTX's Python bindings have no `tensorrt.plugin` module.") from e
    _register_reference_attention(trt, trtp)
    _register_motion_attention(trt, trtp)
    _registered = True


def _torch_dtype(trt, trt_dtype) -> torch.dtype:
    table = {trt.float16: torch.float16, trt.bfloat16: torch.bfloat16, trt.float32: torch.float32}
    if trt_dtype not in table:
        raise TypeError(f"xportrait attention plugins support fp16/bf16/fp32, got {trt_dtype}")
    return table[trt_dtype]


def _static(expr, what: str) -> int:
    if not expr.is_constant:
        raise ValueError(f"xportrait plugin: the {what} must be static at build time (it is compiled into the kernel)")
    return expr.constant_value()


def _combinations(trtp, n_float_in: int, int_in: int = 0):
    """One type combination per dtype: all float I/O share it, int32 counters stay int32."""
    return [trtp.AutoTuneCombination(", ".join([t] * n_float_in + ["INT32"] * int_in + [t]))
            for t in ("FP16", "BF16", "FP32")]


def _register_reference_attention(trt, trtp) -> None:
    pid = "xportrait::reference_attention"

    @trtp.register(pid)
    def _desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, k_ref: trtp.TensorDesc,
              v_ref: trtp.TensorDesc, heads: int, scale: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(pid)
    def _autotune(q, k, v, k_ref, v_ref, outputs):
        return _combinations(trtp, 5)

    @trtp.aot_impl(pid)
    def _aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, k_ref: trtp.TensorDesc,
             v_ref: trtp.TensorDesc, heads: int, scale: float, outputs, tactic: int):
        B, N, C = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
        NK, Br, M = k.shape_expr[1], k_ref.shape_expr[0], k_ref.shape_expr[1]
        c = _static(C, "channel dim of q")
        n_hint = N.constant_value() if N.is_constant else 4096
        compiled, cfg = compile_reference_attention(_torch_dtype(trt, q.dtype), heads, c, scale, n_hint)
        # One shared reference bank (Br == 1) is read with batch stride 0; otherwise Br == B.
        ref_stride_b = 0 if Br.is_constant and Br.constant_value() == 1 else M * c
        scalars = [N, NK, M,
                   N * c, c, NK * c, c, NK * c, c,  # q, k, v (contiguous)
                   ref_stride_b, c, ref_stride_b, c,  # k_ref, v_ref
                   N * c, c]  # out
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(N, cfg["BLOCK_M"])
        launch.grid_y = B * heads
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
        return compiled.metadata.name, compiled.asm["ptx"], launch, extra

    @trtp.impl(pid)
    def _jit(q, k, v, k_ref, v_ref, heads: int, scale: float, outputs, stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = [torch.as_tensor(x, device="cuda") for x in (q, k, v, k_ref, v_ref)]
            ra._launch(*t, heads, scale, torch.as_tensor(outputs[0], device="cuda"))


def _register_motion_attention(trt, trtp) -> None:
    pid = "xportrait::motion_attention"

    @trtp.register(pid)
    def _desc(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc, k_cache: trtp.TensorDesc,
              v_cache: trtp.TensorDesc, pe_k: trtp.TensorDesc, pe_v: trtp.TensorDesc,
              write_slot: trtp.TensorDesc, n_past: trtp.TensorDesc, heads: int, scale: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(pid)
    def _autotune(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, outputs):
        return _combinations(trtp, 7, int_in=2)

    @trtp.aot_impl(pid)
    def _aot(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc, k_cache: trtp.TensorDesc,
             v_cache: trtp.TensorDesc, pe_k: trtp.TensorDesc, pe_v: trtp.TensorDesc, write_slot: trtp.TensorDesc,
             n_past: trtp.TensorDesc, heads: int, scale: float, outputs, tactic: int):
        R, C = q.shape_expr[0], q.shape_expr[1]
        E, L, P = write_slot.shape_expr[0], k_cache.shape_expr[0], pe_k.shape_expr[0]
        c = _static(C, "channel dim of q")
        compiled, cfg = compile_motion_attention(_torch_dtype(trt, q.dtype), heads, c, scale)
        # rows, elements (one counter pair each), ring capacity, table length, cache slot strides
        scalars = [R, E, L, P, R * c, R * c]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = heads
        launch.grid_y = trtp.cdiv(R, cfg["BLOCK_R"])
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
        return compiled.metadata.name, compiled.asm["ptx"], launch, extra

    @trtp.impl(pid)
    def _jit(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads: int, scale: float,
             outputs, stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = [torch.as_tensor(x, device="cuda") for x in (q, k_new, v_new, k_cache, v_cache, pe_k, pe_v,
                                                               write_slot, n_past)]
            ma._launch(*t, heads, scale, torch.as_tensor(outputs[0], device="cuda"), write_cache=False)
