"""models/streaming.py: the single-frame streaming UNet with per-element causal temporal K/V rings.

What is exactly equal: streaming attends causally (a frame sees itself and up to L-1 earlier frames,
at positions 0..n_past), the trained full-window UNet bidirectionally. So frame k of a stream equals
frame k of the full-window UNet whose motion attention is replaced by the same causal sliding window,
written here independently of the ring code (`causal_window`). Past L frames the ring wraps; the
reference then slides the window. The bidirectional full window only agrees for a single frame.

Stream batch: one call carries E elements (ring owners), each with its own counters, timestep,
reference K/V and rows of the rings; every test of it compares against the same elements run alone.
"""
from __future__ import annotations

import pytest
import torch

from models.attention import attention
from models.config import XPortraitConfig
from models.motion import TemporalAttention
from models.streaming import (MAX_WINDOW, StreamingUNet, alloc_ring, motion_attention, motion_layout, ring_advance,
                              ring_bytes, ring_reset, ring_write)

HW = (16, 16)
I32 = dict(dtype=torch.int32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet():
    from models.init import init_random_
    from models.xportrait import XPortrait
    return init_random_(XPortrait(XPortraitConfig.from_name("tiny")), seed=1).eval().unet


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def close_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """NaN in the same places, the rest within 1e-5 of the largest value."""
    return torch.equal(a.isnan(), b.isnan()) and rel(a.nan_to_num(), b.nan_to_num()) < 1e-5


def counters(*values) -> torch.Tensor:
    return torch.tensor(values, **I32)


# ------------------------------------------------------------------------------ the attention op
def dense_reference(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads):
    """Per element: gather its n_past past frames oldest first, add their positions' tables, plain
    softmax attention; rows of element e are the e-th of E equal blocks."""
    E, L = write_slot.numel(), k_cache.shape[0]
    outs = []
    for e, rows in enumerate(torch.arange(q.shape[0]).chunk(E)):
        n, ws = int(n_past[e]), int(write_slot[e])
        slots = [(ws - j) % L for j in range(n, 0, -1)]  # oldest first: positions 0..n-1
        k = torch.stack([k_cache[s, rows] for s in slots] + [k_new[rows]]) + pe_k[: n + 1, None]  # (n+1, HW, C)
        v = torch.stack([v_cache[s, rows] for s in slots] + [v_new[rows]]) + pe_v[: n + 1, None]
        outs.append(attention(q[rows, None], k.transpose(0, 1), v.transpose(0, 1), heads)[:, 0])
    return torch.cat(outs)


def poisoned_ring(g, L, rows, C, write_slot, n_past, extra_rows=0):
    """(L, rows, C) ring as a row-slice view of a bigger ring (slot stride != rows*C), with NaN in every
    slot an element must not read (its write slot and those older than its n_past)."""
    big = torch.randn(L, rows + 2 * extra_rows, C, generator=g)
    ring = big[:, extra_rows:extra_rows + rows]
    for e, r in enumerate(torch.arange(rows).chunk(write_slot.numel())):
        for s in range(L):
            if not 1 <= (int(write_slot[e]) - s) % L <= int(n_past[e]):
                ring[s, r] = float("nan")
    return big, ring


@pytest.mark.parametrize("write_slot,n_past", [((0,), (0,)), ((2,), (3,)), ((5,), (5,)), ((1, 0, 5), (2, 0, 5)),
                                               ((3, 4), (5, 1))])
def test_motion_attention_matches_dense(write_slot, n_past):
    """Per-element counters (E = 1..3), views of a bigger ring, wrap-around, NaN in every unread slot."""
    g = torch.Generator().manual_seed(sum(write_slot) * 10 + sum(n_past))
    ws, n = counters(*write_slot), counters(*n_past)
    L, HWl, C, P, heads = 6, 7, 16, 24, 2
    R = ws.numel() * HWl
    q, k_new, v_new = (torch.randn(R, C, generator=g) for _ in range(3))
    _, k_cache = poisoned_ring(g, L, R, C, ws, n, extra_rows=3)
    _, v_cache = poisoned_ring(g, L, R, C, ws, n, extra_rows=3)
    pe_k, pe_v = torch.randn(P, C, generator=g), torch.randn(P, C, generator=g)
    out = motion_attention(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, ws, n, heads)
    ref = dense_reference(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, ws, n, heads)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5


def test_motion_attention_matches_kernel_reference():
    """Same semantics as kernels/motion_attention.py's reference (a gather, not the in-place read)."""
    kref = pytest.importorskip("kernels.motion_attention").reference
    g = torch.Generator().manual_seed(0)
    L, R, C, heads = 16, 6, 32, 4
    args = [torch.randn(R, C, generator=g) for _ in range(3)] + \
           [torch.randn(L, R, C, generator=g) for _ in range(2)] + [torch.randn(24, C, generator=g) for _ in range(2)]
    for ws, n in (((3,), (15,)), ((15,), (7,)), ((0,), (0,)), ((2, 15, 0), (15, 3, 0))):
        c = [counters(*ws), counters(*n)]
        ours = motion_attention(*args, *c, heads)
        theirs = kref(*args[:3], args[3].clone(), args[4].clone(), *args[5:], *c, heads)
        assert rel(ours, theirs) < 1e-5, (ws, n)


# ----------------------------------------------------------------------------- UNet-level helpers
def causal_window(L: int):
    """TemporalAttention.forward where frame i attends to frames max(0, i-L+1)..i at positions 0..n."""
    def forward(self, x, frames):
        bf, d, c = x.shape
        b = bf // frames
        t = x.reshape(b, frames, d, c).transpose(1, 2).reshape(b * d, frames, c)
        outs = []
        for i in range(frames):
            lo = max(0, i - L + 1)
            win = t[:, lo:i + 1] + self.pos_encoder.pe[:, :i + 1 - lo].to(t.dtype)
            outs.append(attention(self.to_q(win[:, -1:]), self.to_k(win), self.to_v(win), self.heads))
        out = self.to_out(torch.cat(outs, dim=1))
        return out.reshape(b, d, frames, c).transpose(1, 2).reshape(bf, d, c)
    return forward


def stream(unet, x, t, ctx, L, ref_kv=None, control=None, ring=None):
    """Run frames one by one (one element) through StreamingUNet with the host ring protocol; returns
    eps per frame. `ring`: (k, v, write_slot, n_past) to continue, else a fresh NaN-filled one."""
    s = StreamingUNet(unet)
    if ring is None:
        kc, vc = alloc_ring(unet, L, 1, *HW, device=x.device)
        for c in (*kc, *vc):
            c.fill_(float("nan"))  # whatever the ring holds before it is written must not matter
        ring = (kc, vc, counters(0).to(x.device), counters(0).to(x.device))
    kc, vc, ws, n_past = ring
    eps = []
    for i in range(x.shape[0]):
        ctrl = None if control is None else [c[i:i + 1] for c in control]
        e, kn, vn = s(x[i:i + 1], t[i:i + 1], ctx, ref_kv, ctrl, kc, vc, ws, n_past)
        ring_write(kc, vc, kn, vn, ws)
        ring_advance(ws, n_past, L)
        eps.append(e)
    return torch.cat(eps)


def inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, *HW, generator=g), torch.full((n,), 500.0),
            torch.randn(1, 77, 48, generator=g), g)


def _shapes(unet, modules, output: bool):
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, a, out: shapes.append(tuple((out if output else a[0]).shape[1:])))
             for m in modules]
    with torch.no_grad():
        unet(torch.zeros(1, 4, *HW), torch.zeros(1), torch.zeros(1, 77, 48), frames=1)
    for h in hooks:
        h.remove()
    return shapes


def _bank_kv(unet, g, batch: int = 1):
    """Random (K_ref, V_ref) with the shapes of the 16 attn1 layers at HW (found with hooks)."""
    return [(torch.randn(batch, *s, generator=g), torch.randn(batch, *s, generator=g))
            for s in _shapes(unet, unet.attn1_layers(), output=False)]


def _control(unet, n, g):
    """13 residuals with the shapes of the skip connections (+ middle), from one forward pass."""
    return [torch.randn(n, *s, generator=g) * 0.3
            for s in _shapes(unet, (*unet.input_blocks, unet.middle_block), output=True)]


def _use_kernels(unet, on: bool):
    for m in unet.modules():
        if isinstance(m, TemporalAttention):
            m.use_kernels = on


# ------------------------------------------------------------------------- causal equivalence (e)
@torch.no_grad()
@pytest.mark.parametrize("conditional", [False, True])
def test_stream_equals_causal_full_window(unet, monkeypatch, conditional):
    """6 frames through L = 3 slots: every frame matches the causal sliding-window full-window UNet,
    including after the ring wraps."""
    L, N = 3, 6
    x, t, ctx, g = inputs(N)
    ref_kv = control = None
    if conditional:
        ref_kv, control = _bank_kv(unet, g), _control(unet, N, g)
    got = stream(unet, x, t, ctx, L, ref_kv, control)
    monkeypatch.setattr(TemporalAttention, "forward", causal_window(L))
    want = unet(x, t, ctx.expand(N, -1, -1), ref_kv=ref_kv, control=control, frames=N)
    errs = [rel(got[i], want[i]) for i in range(N)]
    print("stream vs causal window, per frame:", [f"{e:.1e}" for e in errs])
    assert max(errs) < 1e-4


@torch.no_grad()
def test_single_frame_equals_full_window(unet):
    """With no past frame (n_past = 0) the streaming UNet is exactly the trained UNet on a 1-frame window."""
    x, t, ctx, _ = inputs(1, seed=1)
    assert rel(stream(unet, x, t, ctx, L=16), unet(x, t, ctx, frames=1)) < 1e-5


@torch.no_grad()
def test_history_matters_and_bidirectional_differs(unet):
    """The cache changes the result (the test above is not vacuous), and the bidirectional window's last
    frame is not the causal one: past frames are not refreshed by the new frame (spec §5.3, option D)."""
    x, t, ctx, _ = inputs(2, seed=2)
    streamed = stream(unet, x, t, ctx, L=16)
    alone = stream(unet, x[1:], t[1:], ctx, L=16)
    window = unet(x, t, ctx.expand(2, -1, -1), frames=2)
    assert rel(streamed[1], alone[0]) > 1e-2
    assert rel(streamed[1], window[1]) > 1e-2


# --------------------------------------------------------------------- per-element counters (a)
@torch.no_grad()
def test_two_streams_in_one_call_reset_and_pause_independently(unet):
    """Streams A and B share every call (E = 2, one ring each, L = 3 so A's ring wraps). B is reset at
    frame 2 and sits out frame 3 (not advanced: its frame is dropped). Each stream's frames equal the
    frames of running it alone: A = its 5 frames, B = (0, 1) then a fresh stream (2, 4)."""
    L, N = 3, 5
    x, _, ctx, g = inputs(2 * N, seed=4)
    xa, xb = x[:N], x[N:]
    ta, tb = torch.full((N,), 700.0), torch.full((N,), 200.0)  # different timesteps per element
    s = StreamingUNet(unet)
    kc, vc = alloc_ring(unet, L, 2, *HW)
    for c in (*kc, *vc):
        c.fill_(float("nan"))
    ws, n_past = counters(0, 0), counters(0, 0)
    got_a, got_b = [], []
    for f in range(N):
        if f == 2:
            ring_reset(ws, n_past, [1])
        eps, _, _ = s(torch.cat([xa[f:f + 1], xb[f:f + 1]]), torch.stack([ta[f], tb[f]]), ctx.expand(2, -1, -1),
                      None, None, kc, vc, ws, n_past, write_ring=True)
        ring_advance(ws, n_past, L, active=torch.tensor([True, f != 3]))
        got_a.append(eps[0:1])
        got_b.append(eps[1:2])
    assert ws.tolist() == [N % L, 2 % L] and n_past.tolist() == [L - 1, 2]
    want_a = stream(unet, xa, ta, ctx, L)
    want_b = torch.cat([stream(unet, xb[:2], tb[:2], ctx, L), stream(unet, xb[[2, 4]], tb[[2, 4]], ctx, L)])
    errs_a = [rel(got_a[f][0], want_a[f]) for f in range(N)]
    errs_b = [rel(got_b[f][0], w) for f, w in zip((0, 1, 2, 4), want_b)]
    print("A:", [f"{e:.1e}" for e in errs_a], "B:", [f"{e:.1e}" for e in errs_b])
    assert max(errs_a + errs_b) < 1e-5
    assert rel(got_b[4][0], stream(unet, xb[[2, 3, 4]], tb[[2, 3, 4]], ctx, L)[2]) > 1e-3  # the pause mattered


# ---------------------------------------------------------------------- stream batch (b)
def _warm_rings(unet, L, depths, seed):
    """One ring per element, each advanced `depth` frames with its own random frames."""
    rings = []
    for e, depth in enumerate(depths):
        kc, vc = alloc_ring(unet, L, 1, *HW)
        for c in (*kc, *vc):
            c.fill_(float("nan"))
        ring = (kc, vc, counters(0), counters(0))
        if depth:
            x, t, ctx, _ = inputs(depth, seed=seed + e)
            stream(unet, x, t, ctx, L, ring=ring)
        rings.append(ring)
    return rings


@torch.no_grad()
def test_stream_batch_equals_sequential_calls(unet):
    """One call with E = 3 elements (different timesteps, per-element and shared reference K/V, own
    controls, rings at depths 0 / 2 / 5 of L = 4, so one wrapped), reading and writing rows 1..3 of a
    5-element ring through views, equals 3 separate calls; rows 0 and 4 stay untouched."""
    L, E = 4, 3
    g = torch.Generator().manual_seed(7)
    rings = _warm_rings(unet, L, (0, 2, 5), seed=20)
    x, t = torch.randn(E, 4, *HW, generator=g), torch.tensor([999.0, 500.0, 20.0])
    ctx = torch.randn(E, 77, 48, generator=g)
    per = _bank_kv(unet, g, batch=E)
    shared = _bank_kv(unet, g, batch=1)
    ref_kv = [p if i % 2 else s for i, (p, s) in enumerate(zip(per, shared))]  # batch E and batch 1 mixed
    control = _control(unet, E, g)

    layout = motion_layout(unet, *HW)
    big = alloc_ring(unet, L, E + 2, *HW)
    for kv in big:
        for c in kv:
            c.normal_(generator=g)
    before = [[c.clone() for c in kv] for kv in big]
    views = [[c[:, n:(E + 1) * n] for c, (n, _) in zip(kv, layout)] for kv in big]
    for i, (n, _) in enumerate(layout):
        for e, (kc, vc, _, _) in enumerate(rings):
            views[0][i][:, e * n:(e + 1) * n] = kc[i]
            views[1][i][:, e * n:(e + 1) * n] = vc[i]
    ws = torch.cat([r[2] for r in rings])
    n_past = torch.cat([r[3] for r in rings])
    assert n_past.tolist() == [0, 2, 3] and ws.tolist() == [0, 2, 1]

    eps, k_new, v_new = StreamingUNet(unet)(x, t, ctx, ref_kv, control, *views, ws, n_past, write_ring=True)
    for e, (kc, vc, ws_e, n_e) in enumerate(rings):
        ref_e = [(k[e:e + 1] if k.shape[0] == E else k, v[e:e + 1] if v.shape[0] == E else v) for k, v in ref_kv]
        eps_e, kn_e, vn_e = StreamingUNet(unet)(x[e:e + 1], t[e:e + 1], ctx[e:e + 1], ref_e,
                                                [c[e:e + 1] for c in control], kc, vc, ws_e, n_e)
        ring_write(kc, vc, kn_e, vn_e, ws_e)
        assert rel(eps[e], eps_e[0]) < 1e-5, e
        for i, (n, _) in enumerate(layout):
            rows = slice(e * n, (e + 1) * n)
            assert rel(k_new[i][rows], kn_e[i]) < 1e-5 and rel(v_new[i][rows], vn_e[i]) < 1e-5, (e, i)
            assert close_nan(views[0][i][:, rows], kc[i]) and close_nan(views[1][i][:, rows], vc[i]), (e, i)
    for kv, kv0 in zip(big, before):
        for c, c0, (n, _) in zip(kv, kv0, layout):
            assert torch.equal(c[:, :n], c0[:, :n]) and torch.equal(c[:, (E + 1) * n:], c0[:, (E + 1) * n:])


# ---------------------------------------------------------------------------- write once (c)
@torch.no_grad()
@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "kernel"])
def test_write_ring_stores_exactly_once(unet, monkeypatch, kernels):
    """write_ring=True (no host write) gives the same eps and rings as write_ring=False + ring_write,
    over 4 frames (kernel: 2) of 2 elements through L = 3 slots; write_ring=False never touches the ring; and the
    store happens in exactly one place: the kernel (write_cache) when kernels are on, else the forward."""
    if kernels:
        pytest.importorskip("triton", reason="Triton is a test extra: pip install -e .[test]")
        import kernels.motion_attention as kma
    import models.streaming as ms
    calls = {"host": 0, "kernel_writes": 0, "kernel_reads": 0}
    real_write = ms._write_layer
    monkeypatch.setattr(ms, "_write_layer", lambda *a: (calls.__setitem__("host", calls["host"] + 1), real_write(*a)))
    if kernels:
        real_kernel = kma.motion_attention

        def counted(*a, write_cache=True, **kw):
            calls["kernel_writes" if write_cache else "kernel_reads"] += 1
            return real_kernel(*a, write_cache=write_cache, **kw)
        monkeypatch.setattr(kma, "motion_attention", counted)
    L, N, E = 3, 2 if kernels else 4, 2  # the interpreted kernel is slow: 2 frames
    dev = "cuda" if kernels and torch.cuda.is_available() else "cpu"  # the compiled kernel needs GPU tensors
    if dev != "cpu":
        import copy
        unet = copy.deepcopy(unet).to(dev)
    x, _, ctx, _ = inputs(N * E, seed=5)
    x, ctx = x.to(dev), ctx.to(dev)
    t = torch.tensor([900.0, 100.0], device=dev)
    s = StreamingUNet(unet)
    a, b = alloc_ring(unet, L, E, *HW, device=dev), alloc_ring(unet, L, E, *HW, device=dev)
    ca, cb = ((counters(0, 1).to(dev), counters(0, 0).to(dev)) for _ in range(2))
    _use_kernels(unet, kernels)
    try:
        for f in range(N):
            xf = x[f * E:(f + 1) * E]
            snapshot = [c.clone() for c in (*b[0], *b[1])]
            eps_b, kn, vn = s(xf, t, ctx.expand(E, -1, -1), None, None, *b, *cb)
            assert all(torch.equal(c, c0) for c, c0 in zip((*b[0], *b[1]), snapshot)), "write_ring=False wrote"
            ring_write(*b, kn, vn, cb[0])
            eps_a, _, _ = s(xf, t, ctx.expand(E, -1, -1), None, None, *a, *ca, write_ring=True)
            assert rel(eps_a, eps_b) < 1e-6, f
            assert all(torch.equal(p, q) for p, q in zip((*a[0], *a[1]), (*b[0], *b[1]))), f
            for c in (ca, cb):
                ring_advance(*c, L)
    finally:
        _use_kernels(unet, False)
    layers = StreamingUNet(unet).num_layers
    # per frame: the write_ring=False run's host ring_write (one per layer), and one store per layer by
    # the write_ring=True run - by the kernel when kernels are on, else in the forward
    assert calls == ({"host": N * layers, "kernel_writes": N * layers, "kernel_reads": N * layers} if kernels else
                     {"host": 2 * N * layers, "kernel_writes": 0, "kernel_reads": 0})


@torch.no_grad()
def test_stream_through_motion_kernel(unet):
    """use_kernels=True routes all 40 motion attentions through kernels/motion_attention.py (Triton;
    CPU interpreter here): same frames as the PyTorch op, ring wrapped, NaN-filled unwritten slots."""
    pytest.importorskip("triton", reason="Triton is a test extra: pip install -e .[test]")
    import copy
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernel on a GPU, interpreter on the CPU
    unet = copy.deepcopy(unet).to(dev)
    x, t, ctx, _ = (v.to(dev) if isinstance(v, torch.Tensor) else v for v in inputs(4, seed=2))
    with _no_tf32():
        want = stream(unet, x, t, ctx, L=3)
        _use_kernels(unet, True)
        try:
            got = stream(unet, x, t, ctx, L=3)
        finally:
            _use_kernels(unet, False)
    assert got.device.type == dev
    assert rel(got, want) < 1e-5


class _no_tf32:
    """fp32 matmuls stay fp32 on a GPU (TF32 would dominate the 1e-5 comparison)."""

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old


# ----------------------------------------------------------------------------------- fp8 ring
@torch.no_grad()
@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "kernel"])
def test_fp8_ring_is_a_rounded_fp32_ring(unet, kernels):
    """A float8_e4m3fn ring (half the bytes of fp16) behaves exactly like an fp32 ring whose stored K/V
    are rounded to e4m3 by torch (ring_write's cast), read with the model's math - on the torch path
    and through the kernel, which reads fp8 and leaves the store to the forward. Prints how far the
    rounding moves eps on random weights (not a quality claim)."""
    if kernels:
        pytest.importorskip("triton", reason="Triton is a test extra: pip install -e .[test]")
        if torch.cuda.is_available():
            pytest.skip("CPU tensors: on a GPU, test_stream_through_motion_kernel runs the compiled kernel")
    L, N = 3, 2 if kernels else 4
    x, t, ctx, _ = inputs(N, seed=9)
    s = StreamingUNet(unet)
    r8 = alloc_ring(unet, L, 1, *HW, dtype=torch.float8_e4m3fn)
    rq, rf = alloc_ring(unet, L, 1, *HW), alloc_ring(unet, L, 1, *HW)
    c8, cq, cf = ((counters(0), counters(0)) for _ in range(3))
    assert sum(c.nbytes for c in (*r8[0], *r8[1])) * 2 == ring_bytes(unet, L - 1, 1, *HW, dtype=torch.float16)
    moved = []
    for f in range(N):
        xf, tf = x[f:f + 1], t[f:f + 1]
        _use_kernels(unet, kernels and f == N - 1)  # interpreted kernel: slow, so the last frame only
        try:
            e8, _, _ = s(xf, tf, ctx, None, None, *r8, *c8, write_ring=True)
        finally:
            _use_kernels(unet, False)
        eq, kn, vn = s(xf, tf, ctx, None, None, *rq, *cq)
        ring_write(*rq, kn, vn, cq[0])
        for c in (*rq[0], *rq[1]):
            c.copy_(c.to(torch.float8_e4m3fn).float())
        ef, _, _ = s(xf, tf, ctx, None, None, *rf, *cf, write_ring=True)
        assert rel(e8, eq) < 1e-5, f
        for a, b in zip((*r8[0], *r8[1]), (*rq[0], *rq[1])):
            if not kernels:
                assert torch.equal(a.float(), b), f
            else:  # the kernel's outputs differ from torch's by ~1e-7, which can flip a rounding to e4m3
                flips = a.float() != b
                assert float(flips.float().mean()) < 1e-3 and bool(((a.float() - b).abs() <= b.abs() / 8)[flips].all()), f
        moved.append(rel(e8, ef))
        for c in (c8, cq, cf):
            ring_advance(*c, L)
    print("fp8 ring vs fp32 ring, eps rel err per frame:", [f"{m:.1e}" for m in moved])
    assert moved[0] == 0 and max(moved[1:]) > 0  # frame 0 reads no ring; later frames read rounded K/V


# ---------------------------------------------------------------------------------- window 0 (d)
@torch.no_grad()
def test_window_zero_has_no_ring_and_sees_the_frame_alone(unet):
    x, t, ctx, g = inputs(2, seed=6)
    t = torch.tensor([800.0, 50.0])
    assert alloc_ring(unet, 1, 2, *HW) == (None, None) and ring_bytes(unet, 0, 2, *HW) == 0
    ref_kv, control = _bank_kv(unet, g, batch=2), _control(unet, 2, g)
    eps, k_new, v_new = StreamingUNet(unet)(x, t, ctx.expand(2, -1, -1), ref_kv, control, None, None, None, None)
    assert k_new == [] and v_new == []
    for e in range(2):
        ref_e = [(k[e:e + 1], v[e:e + 1]) for k, v in ref_kv]
        want = unet(x[e:e + 1], t[e:e + 1], ctx, ref_kv=ref_e, control=[c[e:e + 1] for c in control], frames=1)
        assert rel(eps[e], want[0]) < 1e-5, e
    with pytest.raises(ValueError, match="both"):
        StreamingUNet(unet)(x, t, ctx.expand(2, -1, -1), None, None, *alloc_ring(unet, 2, 2, *HW)[:1], None,
                            None, None)


# ---------------------------------------------------------------------------- pe tables (f)
@torch.no_grad()
def test_position_tables_are_computed_once_per_layer(unet):
    """W_k·pe / W_v·pe are computed on the first call only; an in-place weight change (as
    load_state_dict or a LoRA fuse makes) recomputes exactly that layer's tables, and the result then
    equals a fresh module's (stale tables would not)."""
    mods = [m for m in unet.modules() if isinstance(m, TemporalAttention)]
    P = mods[0].pos_encoder.pe.shape[1]
    seen = []
    hooks = [lin.register_forward_hook(lambda mod, a, out: seen.append(mod) if a[0].shape[0] == P else None)
             for m in mods for lin in (m.to_k, m.to_v)]
    s = StreamingUNet(unet)
    x, t, ctx, _ = inputs(1, seed=8)
    ring = alloc_ring(unet, 3, 1, *HW)
    try:
        s(x, t, ctx, None, None, *ring, counters(0), counters(0))
        assert len(seen) == 2 * len(mods) == 80
        seen.clear()
        s(x, t, ctx, None, None, *ring, counters(1), counters(1))
        assert seen == []
        w = mods[7].to_v.weight
        orig = w.clone()
        w.mul_(1.5)  # in place, like load_state_dict's copy_
        try:
            eps, _, _ = s(x, t, ctx, None, None, *ring, counters(1), counters(1))
            assert seen == [mods[7].to_k, mods[7].to_v]
            fresh, _, _ = StreamingUNet(unet)(x, t, ctx, None, None, *ring, counters(1), counters(1))
            assert torch.equal(eps, fresh)
        finally:
            w.copy_(orig)
        seen.clear()
        s.refresh()
        s(x, t, ctx, None, None, *ring, counters(1), counters(1))
        assert len(seen) == 80
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------- host helpers
def test_ring_helpers(unet):
    kc, vc = alloc_ring(unet, 4, 2, *HW)
    layout = motion_layout(unet, *HW)
    assert len(kc) == len(vc) == len(layout) == 40 == StreamingUNet(unet).num_layers
    assert [tuple(k.shape) for k in kc] == [(4, 2 * n, c) for n, c in layout]
    assert ring_bytes(unet, 3, 2, *HW, dtype=torch.float32) == sum(t.nbytes for t in (*kc, *vc))
    assert ring_bytes(unet, 3, 2, *HW, dtype=torch.float8_e4m3fn) * 2 == ring_bytes(unet, 3, 2, *HW)
    ws, n_past = counters(3, 1), counters(2, 0)
    new = [torch.cat([torch.full((n, c), 7.0), torch.full((n, c), 8.0)]) for n, c in layout]
    ring_write(kc, vc, new, new, ws)
    for k, (n, _) in zip(kc, layout):
        assert bool((k[3, :n] == 7).all()) and bool((k[1, n:] == 8).all())
        assert float(k.abs().sum()) == float(k[3, :n].sum() + k[1, n:].sum())  # nothing else written
    ring_advance(ws, n_past, 4)
    assert ws.tolist() == [0, 2] and n_past.tolist() == [3, 1]
    ring_advance(ws, n_past, 4, active=torch.tensor([True, False]))
    assert ws.tolist() == [1, 2] and n_past.tolist() == [3, 1]  # saturates at L - 1; element 1 paused
    for which in ([1], 1, torch.tensor([1]), torch.tensor([False, True])):
        a, b = ws.clone(), n_past.clone()
        ring_reset(a, b, which)
        assert a.tolist() == [1, 0] and b.tolist() == [3, 0], which
    ring_reset(ws, n_past)
    assert ws.tolist() == [0, 0] and n_past.tolist() == [0, 0]
    with pytest.raises(ValueError, match="window"):
        alloc_ring(unet, MAX_WINDOW + 2, 1, *HW)
    with pytest.raises(ValueError, match="window"):
        ring_bytes(unet, -1, 1, *HW)
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        StreamingUNet(unet)(torch.zeros(2, 4, *HW), torch.zeros(2), torch.zeros(2, 77, 48), None, None, kc, vc,
                            counters(0), counters(0))
