"""Kernels vs their plain-PyTorch references (kernels/*.py), tolerance relative to torch's own error.

Without a GPU the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set here before Triton
is imported (and kernels/ also honours it at launch time if Triton was imported earlier in the same
pytest process). With a GPU the same tests run the compiled kernels on CUDA.

Tolerances (docs/kernels.md): the "truth" is reference() in float64. fp32 kernels must be within a
relative error (max abs error / max |truth|) of 1e-5; fp16/bf16 kernels within 2x the error of
reference() run in that dtype, plus 1e-5 relative. Outputs are poisoned with NaN before each launch.
"""

import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # Triton reads it once, at its first import in the process

from conftest import require  # noqa: E402

triton = require("triton")  # a required test dependency: a skip outside CI, a failure under CI=true

from kernels import motion_attention as ma  # noqa: E402
from kernels import reference_attention as ra  # noqa: E402

if not ON_GPU and not ra.triton_interprets():
    pytest.skip("no GPU, and Triton was imported by an earlier test module before TRITON_INTERPRET=1 could be set: "
                "set TRITON_INTERPRET=1 in the environment or at the top of tests/conftest.py, or run this file alone",
                allow_module_level=True)

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [40, 80, 160]
HEADS = 2  # SD1.5 uses 8; 2 keeps the interpreter fast and still checks the head packing


def _gen(request) -> torch.Generator:
    """Distinct, reproducible inputs per test (seeded by the test id)."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def _check(out, ref_lo, ref64, dtype, what):
    """|kernel - truth| <= 1e-5 relative (fp32) or 2 |torch_lowprec - truth| + 1e-5 relative."""
    assert out.shape == ref64.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten or bad elements)"
    size = ref64.abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    err_torch = (ref_lo.double() - ref64).abs().max().item()
    print(f"{what}: max|ref|={size:.3g} kernel err={err:.3g} torch {dtype} err={err_torch:.3g}")
    if dtype == torch.float32:
        assert err <= 1e-5 * size
    else:
        assert err <= 2 * err_torch + 1e-5 * size


def _equal_nan(a, b):
    """Bitwise-equal values with NaN where the other has NaN."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_split_head_dim():
    assert [ra.split_head_dim(d) for d in (40, 80, 160, 64, 8)] == [(32, 16), (64, 16), (128, 32), (64, 0), (16, 0)]
    assert [ra.split_head_dim(d, minimum=1) for d in (40, 80, 160, 1)] == [(32, 8), (64, 16), (128, 32), (1, 0)]


# ----------------------------------------------------------------------------------- reference attention

# (batch, N query/own-key tokens, M reference tokens, reference batch Br)
RA_CASES = {
    "shared_bank_ragged": (2, 37, 29, 1),  # Br=1 broadcast, N and M not multiples of the tiles
    "self_only": (2, 45, 0, 1),  # M=0: plain self-attention (uncond branch)
    "per_frame_bank_multi_tile": (2, 140, 50, 2),  # Br=B, several query and key tiles
}


def _ra_inputs(gen, dtype, d, case):
    B, N, M, Br = RA_CASES[case]
    C = HEADS * d
    q, k, v = (_randn(gen, B, N, C, dtype=dtype) for _ in range(3))
    k_ref, v_ref = (_randn(gen, Br, M, C, dtype=dtype) for _ in range(2))
    return q, k, v, k_ref, v_ref


@pytest.mark.parametrize("case", list(RA_CASES))
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_attention_matches_reference(request, dtype, d, case):
    q, k, v, k_ref, v_ref = _ra_inputs(_gen(request), dtype, d, case)
    out = torch.full_like(q, float("nan"))
    ra._launch(q, k, v, k_ref, v_ref, HEADS, d**-0.5, out)
    ref64 = ra.reference(*(t.double() for t in (q, k, v, k_ref, v_ref)), HEADS)
    ref_lo = ra.reference(q, k, v, k_ref, v_ref, HEADS)
    _check(out, ref_lo, ref64, dtype, f"reference_attention {case} D={d}")


def test_reference_attention_public_api_and_torch_ops(request):
    q, k, v, k_ref, v_ref = _ra_inputs(_gen(request), torch.float32, 40, "shared_bank_ragged")
    out = ra.reference_attention(q, k, v, k_ref, v_ref, HEADS, scale=0.3)
    via_ops = torch.ops.xportrait.reference_attention.default(q, k, v, k_ref, v_ref, HEADS, 0.3)
    ref = ra.reference(q, k, v, k_ref, v_ref, HEADS, scale=0.3)
    assert torch.equal(out, via_ops)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_reference_attention_strided_views(request):
    """q/k/v as column slices of one fused (B, N, 3C) projection, no copies needed."""
    gen = _gen(request)
    B, N, C = 2, 33, HEADS * 80
    qkv = _randn(gen, B, N, 3 * C, dtype=torch.float32)
    q, k, v = qkv.split(C, dim=-1)
    k_ref, v_ref = (_randn(gen, 1, 20, C, dtype=torch.float32) for _ in range(2))
    out = ra.reference_attention(q, k, v, k_ref, v_ref, HEADS)
    ref = ra.reference(q, k, v, k_ref, v_ref, HEADS)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


# -------------------------------------------------------------------------------------- motion attention

# (ring capacity L, write_slot, n_past)
MA_CASES = {
    "first_frame": (16, 0, 0),  # empty ring: attention over the new frame only
    "partly_filled": (16, 5, 5),  # slots 0..4 hold the past, no wrap
    "full_wrapped": (16, 3, 15),  # write_slot < n_past: the past wraps around the ring end
    "small_ring_wrapped": (6, 1, 4),  # partly filled and wrapped
}
ROWS = 37  # streams x positions; ragged against every BLOCK_R
P = 24  # positional-table length (max_len of the motion modules)


def _ma_inputs(gen, dtype, d, case):
    L, ws, n_past = MA_CASES[case]
    C = HEADS * d
    q, k_new, v_new = (_randn(gen, ROWS, C, dtype=dtype) for _ in range(3))
    k_cache, v_cache = (_randn(gen, L, ROWS, C, dtype=dtype) for _ in range(2))
    live = {(ws - j) % L for j in range(1, n_past + 1)}
    for slot in set(range(L)) - live:  # stale and to-be-written slots: any read of them shows up as NaN
        k_cache[slot] = float("nan")
        v_cache[slot] = float("nan")
    pe_k, pe_v = (_randn(gen, P, C, dtype=dtype) for _ in range(2))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, torch.tensor([ws], **i32), torch.tensor([n_past], **i32)


@pytest.mark.parametrize("case", list(MA_CASES))
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_motion_attention_matches_reference(request, dtype, d, case):
    args = _ma_inputs(_gen(request), dtype, d, case)
    q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, ws, n_past = args
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    ref64 = ma.reference(q.double(), k_new.double(), v_new.double(), kc_ref.double(), vc_ref.double(),
                         pe_k.double(), pe_v.double(), ws, n_past, HEADS)
    ref_lo = ma.reference(q, k_new, v_new, kc_ref, vc_ref, pe_k, pe_v, ws, n_past, HEADS)

    out = torch.full_like(q, float("nan"))
    ma._launch(*args, HEADS, d**-0.5, out)
    _check(out, ref_lo, ref64, dtype, f"motion_attention {case} D={d}")
    # Ring write: slot write_slot now holds the raw new k/v; every other slot is bitwise untouched
    # (NaN-poisoned stale slots included). The reference performed the same write on its copy.
    slot = MA_CASES[case][1]
    assert torch.equal(k_cache[slot], k_new) and torch.equal(v_cache[slot], v_new)
    assert _equal_nan(k_cache, kc_ref) and _equal_nan(v_cache, vc_ref)


def test_motion_attention_streaming_sequence(request):
    """Feed frames one by one through a small ring (wrapping twice) and compare every step with the
    reference run on its own copy of the ring."""
    gen = _gen(request)
    L, d, dtype = 4, 40, torch.float32
    C = HEADS * d
    k_cache, v_cache = (torch.zeros(L, ROWS, C, device=DEVICE) for _ in range(2))
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    pe_k, pe_v = (_randn(gen, P, C, dtype=dtype) for _ in range(2))
    for frame in range(2 * L + 1):
        q, k_new, v_new = (_randn(gen, ROWS, C, dtype=dtype) for _ in range(3))
        ws = torch.tensor([frame % L], dtype=torch.int32, device=DEVICE)
        n_past = torch.tensor([min(frame, L - 1)], dtype=torch.int32, device=DEVICE)
        out = ma.motion_attention(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, ws, n_past, HEADS)
        ref = ma.reference(q, k_new, v_new, kc_ref, vc_ref, pe_k, pe_v, ws, n_past, HEADS)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), f"frame {frame}"
        assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref), f"frame {frame}"


# (write_slot, n_past) per element: first frame, wrapped, partly filled, wrapped at write_slot 0
MA_ELEMENTS = ((0, 0), (2, 5), (5, 3), (0, 5))


def _elements_ring(gen, dtype, L, rows_per, C, ws, n_past, extra=3):
    """(L, E*rows_per, C) ring as a row-slice view of a bigger ring (slot stride != R*C; `extra` rows on
    both sides that no call may touch), NaN in every slot an element must not read."""
    big = _randn(gen, L, len(ws) * rows_per + 2 * extra, C, dtype=dtype)
    ring = big[:, extra:extra + len(ws) * rows_per]
    for e, (w, n) in enumerate(zip(ws, n_past)):
        for slot in range(L):
            if not 1 <= (w - slot) % L <= n:
                ring[slot, e * rows_per:(e + 1) * rows_per] = float("nan")
    return big, ring


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_motion_attention_per_element_counters_on_ring_views(request, dtype):
    """E = 4 elements with their own (write_slot, n_past), 5 rows each (blocks straddle elements),
    caches that are views of a bigger ring: output vs the float64 reference; each element's slot gets
    its own k_new/v_new rows and every other byte of the big ring is untouched; write_cache=False
    gives the same output and writes nothing."""
    gen = _gen(request)
    L, rows_per, d = 6, 5, 40
    ws, n_past = zip(*MA_ELEMENTS)
    C, R = HEADS * d, len(ws) * rows_per
    q, k_new, v_new = (_randn(gen, R, C, dtype=dtype) for _ in range(3))
    (kbig, kc), (vbig, vc) = (_elements_ring(gen, dtype, L, rows_per, C, ws, n_past) for _ in range(2))
    pe_k, pe_v = (_randn(gen, P, C, dtype=dtype) for _ in range(2))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    counters = (torch.tensor(ws, **i32), torch.tensor(n_past, **i32))
    kbig0, vbig0 = kbig.clone(), vbig.clone()
    ref64 = ma.reference(q.double(), k_new.double(), v_new.double(), kc.double(), vc.double(), pe_k.double(),
                         pe_v.double(), *counters, HEADS, write_cache=False)
    ref_lo = ma.reference(q, k_new, v_new, kc.clone(), vc.clone(), pe_k, pe_v, *counters, HEADS)

    out = ma.motion_attention(q, k_new, v_new, kc, vc, pe_k, pe_v, *counters, HEADS, write_cache=False)
    _check(out, ref_lo, ref64, dtype, "motion_attention per element, no write")
    assert _equal_nan(kbig, kbig0) and _equal_nan(vbig, vbig0)
    out2 = ma.motion_attention(q, k_new, v_new, kc, vc, pe_k, pe_v, *counters, HEADS)
    assert torch.equal(out2, out)
    for big, big0, new in ((kbig, kbig0, k_new), (vbig, vbig0, v_new)):
        for e, w in enumerate(ws):
            rows = slice(3 + e * rows_per, 3 + (e + 1) * rows_per)
            assert torch.equal(big[w, rows], new[e * rows_per:(e + 1) * rows_per]), e
            big0[w, rows] = new[e * rows_per:(e + 1) * rows_per]
        assert _equal_nan(big, big0)  # nothing else was written (NaN slots and the rows outside the view)


def test_motion_attention_fp8_ring(request):
    """An fp8 (e4m3) ring is read with fp32 math: kernel = reference on the same ring; the kernel
    refuses to write it (the caller stores k_new/v_new with torch's rounding)."""
    gen = _gen(request)
    L, rows_per, d = 6, 5, 40
    ws, n_past = zip(*MA_ELEMENTS)
    C, R = HEADS * d, len(ws) * rows_per
    q, k_new, v_new = (_randn(gen, R, C, dtype=torch.float32) for _ in range(3))
    kc, vc = (_randn(gen, L, R, C, dtype=torch.float32).to(torch.float8_e4m3fn) for _ in range(2))
    pe_k, pe_v = (_randn(gen, P, C, dtype=torch.float32) for _ in range(2))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    counters = (torch.tensor(ws, **i32), torch.tensor(n_past, **i32))
    ref = ma.reference(q, k_new, v_new, kc, vc, pe_k, pe_v, *counters, HEADS, write_cache=False)
    out = ma.motion_attention(q, k_new, v_new, kc, vc, pe_k, pe_v, *counters, HEADS, write_cache=False)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    with pytest.raises(TypeError, match="ring_write"):
        ma.motion_attention(q, k_new, v_new, kc, vc, pe_k, pe_v, *counters, HEADS)


def test_motion_attention_torch_ops_mutates_cache(request):
    args = _ma_inputs(_gen(request), torch.float32, 80, "partly_filled")
    q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, ws, n_past = args
    out = torch.ops.xportrait.motion_attention.default(*args, HEADS, 80**-0.5)
    assert torch.isfinite(out).all() and torch.equal(k_cache[5], k_new) and torch.equal(v_cache[5], v_new)
    schema = torch.ops.xportrait.motion_attention.default._schema
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["k_cache", "v_cache"]


# -------------------------------------------------------------------------- fake impls, compile, errors


def test_fake_impls_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(3, 17, 320, dtype=torch.float16, device=DEVICE)
        k_ref = torch.empty(1, 5, 320, dtype=torch.float16, device=DEVICE)
        out = torch.ops.xportrait.reference_attention(q, q, q, k_ref, k_ref, 8, 0.1)
        assert out.shape == q.shape and out.dtype == q.dtype
        r = torch.empty(64, 640, dtype=torch.bfloat16, device=DEVICE)
        cache = torch.empty(16, 64, 640, dtype=torch.bfloat16, device=DEVICE)
        pe = torch.empty(24, 640, dtype=torch.bfloat16, device=DEVICE)
        i = torch.empty(1, dtype=torch.int32, device=DEVICE)
        out = torch.ops.xportrait.motion_attention(r, r, r, cache, cache, pe, pe, i, i, 8, 0.1)
        assert out.shape == r.shape and out.dtype == r.dtype
    q = torch.empty(2, 9, 160, device="meta")
    assert torch.ops.xportrait.reference_attention(q, q, q, q[:1], q[:1], 4, 0.2).shape == q.shape


def test_custom_ops_pass_opcheck(request):
    """torch.library.opcheck: schema (incl. declared mutation), fake impl and dispatch consistency."""
    q, k, v, k_ref, v_ref = _ra_inputs(_gen(request), torch.float32, 40, "shared_bank_ragged")
    torch.library.opcheck(torch.ops.xportrait.reference_attention.default, (q, k, v, k_ref, v_ref, HEADS, 0.2),
                          test_utils=("test_schema", "test_faketensor"))
    args = _ma_inputs(_gen(request), torch.float32, 40, "partly_filled")
    torch.library.opcheck(torch.ops.xportrait.motion_attention.default, (*args, HEADS, 0.2),
                          test_utils=("test_schema", "test_faketensor"))


def test_ops_trace_under_torch_compile(request):
    """fullgraph torch.compile traces both ops through their fake impls (aot_eager keeps it CPU-cheap)."""
    q, k, v, k_ref, v_ref = _ra_inputs(_gen(request), torch.float32, 40, "shared_bank_ragged")
    args = _ma_inputs(_gen(request), torch.float32, 40, "partly_filled")
    kc, vc = args[3].clone(), args[4].clone()

    def step(q, k, v, k_ref, v_ref, ma_args):
        a = ra.reference_attention(q, k, v, k_ref, v_ref, HEADS)
        b = ma.motion_attention(*ma_args, HEADS)
        return a * 2, b + 1

    torch._dynamo.reset()
    a, b = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, k_ref, v_ref, args)
    assert (a / 2 - ra.reference(q, k, v, k_ref, v_ref, HEADS)).abs().max() <= 1e-5 * a.abs().max()
    ref_b = ma.reference(*args[:3], kc, vc, *args[5:], HEADS)
    assert (b - 1 - ref_b).abs().max() <= 1e-5 * ref_b.abs().max()
    assert _equal_nan(args[3], kc) and _equal_nan(args[4], vc)  # the compiled graph kept the ring write


def test_cpu_without_interpreter_points_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 4, 80)
    with pytest.raises(RuntimeError, match="reference"):
        ra.reference_attention(q, q, q, q, q, 2)
    r, c, i = torch.randn(4, 80), torch.randn(3, 4, 80), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="reference"):
        ma.motion_attention(r, r, r, c, c, c[0], c[0], i, i, 2)


def test_bad_inputs_raise():
    q = torch.randn(2, 4, 80)
    with pytest.raises(ValueError, match="k_ref"):
        ra.reference(q, q, q, torch.randn(3, 5, 80), torch.randn(3, 5, 80), 2)  # Br not in {1, B}
    with pytest.raises(ValueError, match="divisible"):
        ra.reference(q, q, q, q, q, 3)
    r, c = torch.randn(4, 80), torch.randn(3, 4, 80)
    with pytest.raises(TypeError, match="int32"):
        ma.reference(r, r, r, c, c, c[0], c[0], torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int32), 2)
    i3 = torch.zeros(3, dtype=torch.int32)  # 3 elements cannot split 4 rows
    with pytest.raises(ValueError, match="dividing"):
        ma.reference(r, r, r, c, c, c[0], c[0], i3, i3, 2)


# ------------------------------------------------------------------------- TensorRT plugins (engines/plugins)


_PTX_SCRIPT = """
import json, torch
from triton.backends.compiler import GPUTarget
from engines.plugins import attention as pa
sm90 = GPUTarget("cuda", 90, 32)
ra, _ = pa.compile_reference_attention(torch.float16, 8, 640, 80**-0.5, target=sm90)
ma, _ = pa.compile_motion_attention(torch.bfloat16, 8, 1280, 160**-0.5, target=sm90)
print(json.dumps({"reference_attention": ra.asm["ptx"], "motion_attention": ma.asm["ptx"]}))
"""


def _run_clean_python(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter from the repo root, without TRITON_INTERPRET (Triton fixes its
    mode at import, so compiling for a GPU target needs a process that never set it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)


def _ptx_params(ptx: str) -> list[str]:
    """Parameter types of the PTX entry point, e.g. ['u64', 'u32', ...]."""
    entry = ptx[ptx.index(".entry"):]
    entry = entry[entry.index("(") + 1:entry.index(")")]
    return [line.split()[1].lstrip(".") for line in entry.splitlines() if line.strip().startswith(".param")]


def test_trt_aot_ptx_follows_plugin_calling_convention():
    """The AOT path compiles both kernels for sm_90 without a GPU, and each PTX entry takes (input
    pointers, int32 scalars, output pointer) in the order the plugin passes them. Triton >= 3.3
    appends two scratch pointers (unused, sizes checked to be 0)."""
    res = _run_clean_python(_PTX_SCRIPT)
    assert res.returncode == 0, res.stderr[-3000:]
    ptx = json.loads(res.stdout.strip().splitlines()[-1])
    expected = {"reference_attention": ["u64"] * 5 + ["u32"] * 15 + ["u64"],
                "motion_attention": ["u64"] * 9 + ["u32"] * 6 + ["u64"]}
    for which, want in expected.items():
        params = _ptx_params(ptx[which])
        assert params[:len(want)] == want and len(params) - len(want) in (0, 1, 2), (which, params)


def test_trt_plugins_explain_when_unavailable(monkeypatch):
    """Without tensorrt.plugin (here simulated, so it runs everywhere) registration names the fix."""
    from engines.plugins import PluginsUnavailable, plugins_available, register_plugins

    monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)  # `import tensorrt.plugin` now raises ImportError
    assert not plugins_available()
    with pytest.raises(PluginsUnavailable, match="tensorrt.plugin"):
        register_plugins()


@pytest.mark.trt
def test_trt_plugins_register():
    pytest.importorskip("tensorrt.plugin", reason="needs full TensorRT >= 10.7 with tensorrt.plugin")
    import tensorrt.plugin as trtp

    from engines.plugins import register_plugins

    register_plugins()
    register_plugins()  # idempotent
    assert hasattr(trtp.op.xportrait, "reference_attention") and hasattr(trtp.op.xportrait, "motion_attention")


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize("which", ["reference_attention", "motion_attention"])
def test_trt_plugin_engine_matches_reference(request, which):
    """Build a one-plugin TensorRT engine (AOT path) and compare it with reference() (GPU + TensorRT only)."""
    pytest.importorskip("tensorrt.plugin", reason="needs full TensorRT >= 10.7 with tensorrt.plugin")
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from engines.plugins import register_plugins

    register_plugins()
    gen = _gen(request)
    if which == "reference_attention":
        inputs = dict(zip(["q", "k", "v", "k_ref", "v_ref"], _ra_inputs(gen, torch.float32, 80, "shared_bank_ragged")))
        expected = ra.reference(*inputs.values(), HEADS)
    else:
        args = _ma_inputs(gen, torch.float32, 40, "small_ring_wrapped")
        inputs = dict(zip(["q", "k_new", "v_new", "k_cache", "v_cache", "pe_k", "pe_v", "write_slot", "n_past"], args))
        expected = ma.reference(*(a.clone() for a in args), HEADS)  # the plugin leaves the ring alone
    scale = (expected.shape[-1] // HEADS) ** -0.5

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    trt_type = {torch.float32: trt.float32, torch.int32: trt.int32}
    tensors = [network.add_input(name, trt_type[t.dtype], tuple(t.shape)) for name, t in inputs.items()]
    layer = network.add_plugin(getattr(trtp.op.xportrait, which)(*tensors, heads=HEADS, scale=scale), aot=True)
    layer.get_output(0).name = "out"
    network.mark_output(layer.get_output(0))
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    assert plan is not None, "TensorRT build failed (see the log above)"
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    out = torch.full_like(expected, float("nan"))
    for name, t in inputs.items():
        context.set_tensor_address(name, t.data_ptr())
    context.set_tensor_address("out", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-interpreter error path only")
def test_interpreter_set_after_triton_import_fails_clearly():
    """Triton fixes interpret-vs-compile at its import; setting TRITON_INTERPRET later must give an
    error naming the fix, not a confusing failure inside Triton."""
    code = (
        "import os, torch\n"
        "from kernels import reference_attention as ra\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "q = torch.randn(1, 5, 80)\n"
        "try:\n"
        "    ra.reference_attention(q, q, q, q, q, 2)\n"
        "except RuntimeError as e:\n"
        "    assert 'before the first' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    res = _run_clean_python(code)
    assert res.returncode == 0, res.stderr[-2000:]


def test_bench_without_gpu_exits_cleanly(monkeypatch, capsys):
    """bench/kernels.py: an error exit and a message without a GPU (simulated, so it runs everywhere)."""
    import bench.kernels as bk

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bk.main([]) in (1, 2) and "no CUDA GPU" in capsys.readouterr().err  # models/cli.py exit codes


def test_bench_baselines_agree(monkeypatch):
    """With a fake timer, every bench provider (Triton, SDPA on the concatenation/gather, reference)
    matches the fp32 reference, on DEVICE (compiled kernels on a GPU, the interpreter on the CPU)."""
    import bench.kernels as bk

    monkeypatch.setattr(bk, "LEVELS", [(9, 80), (16, 160)])
    monkeypatch.setattr(bk, "RA_EXTRA", [(12, 80)])
    monkeypatch.setattr(bk, "MOTION_EXTRA", [])
    monkeypatch.setattr(bk, "HEADS", HEADS)
    monkeypatch.setattr(bk, "_time", lambda fn, warmup_ms, rep_ms: (1.0, 0.9, 1.1))
    rows = bk.bench_reference_attention(torch.float32, 2, 1, 1, device=DEVICE)
    rows += bk.bench_motion_attention(torch.float32, 2, 1, 1, device=DEVICE)
    bk.print_table(rows)
    json.dumps(rows)
    checked = [r for r in rows if r["skipped"] is None]
    assert {r["provider"] for r in checked} >= {"triton", "reference"} and len(checked) >= 8
    assert all(r["rel_err"] < 1e-5 for r in checked), [(r["provider"], r["rel_err"]) for r in checked]


@pytest.mark.parametrize("channels", [32, 64, 96, 24])  # D = 4, 8, 12, 3: below one tl.dot tile
def test_reference_attention_small_head_dims(channels):
    """Head dims under 16 (the tiny preset's 4 and 8) are padded in-register; channels past D are masked."""
    from kernels.reference_attention import reference_attention, reference
    g = torch.Generator().manual_seed(channels)
    q, k, v = (torch.randn(2, 37, channels, generator=g).to(DEVICE) for _ in range(3))
    kr, vr = (torch.randn(1, 19, channels, generator=g).to(DEVICE) for _ in range(2))
    out = reference_attention(q, k, v, kr, vr, 8)
    want = reference(q.double(), k.double(), v.double(), kr.double(), vr.double(), 8)
    assert ((out.double() - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_attention_large_smem_config(request, dtype):
    """The D=160 tile chosen where shared memory allows it (A100, H100/H200; bench/kernels.py --sweep times it)
    fits that memory by the configs' own estimate, and the kernel run with it matches the reference
    (several query and key tiles, ragged N and M)."""
    d0, d1 = ra.split_head_dim(160)
    small = ra._launch_config(4096, d0, d1)
    large = ra._launch_config(4096, d0, d1, smem=227 * 1024)
    assert ra.smem_estimate(small, d0 + d1) <= 99 * 1024 < ra.smem_estimate(large, d0 + d1) <= ra.LARGE_SMEM
    assert large["BLOCK_M"] * large["BLOCK_N"] > small["BLOCK_M"] * small["BLOCK_N"]
    q, k, v, k_ref, v_ref = _ra_inputs(_gen(request), dtype, 160, "per_frame_bank_multi_tile")
    out = torch.full_like(q, float("nan"))
    ra._launch(q, k, v, k_ref, v_ref, HEADS, 160**-0.5, out, config=large)
    ref64 = ra.reference(*(t.double() for t in (q, k, v, k_ref, v_ref)), HEADS)
    _check(out, ra.reference(q, k, v, k_ref, v_ref, HEADS), ref64, dtype, "reference_attention D=160 large tile")
