"""models/streaming.py: the single-frame streaming UNet with causal temporal K/V ring caches.

What is exactly equal: streaming attends causally (a frame sees itself and up to L-1 earlier frames,
at positions 0..n_past), the trained full-window UNet bidirectionally. So frame k of a stream equals
frame k of the full-window UNet whose motion attention is replaced by the same causal sliding window,
written here independently of the cache code (`causal_window`). Past L frames the ring wraps; the
reference then slides the window. The bidirectional full window only agrees for a single frame.
"""
from __future__ import annotations

import pytest
import torch

from models.attention import attention
from models.config import XPortraitConfig
from models.motion import TemporalAttention
from models.streaming import (StreamingUNet, alloc_ring, motion_attention, motion_layout, ring_advance,
                              ring_write)

HW = (16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet():
    from models.init import init_random_
    from models.xportrait import XPortrait
    return init_random_(XPortrait(XPortraitConfig.from_name("tiny")), seed=1).eval().unet


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def dense_reference(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, write_slot, n_past, heads):
    """Gather the n_past past frames oldest first, add their positions' tables, plain softmax attention."""
    n, ws, L = int(n_past), int(write_slot), k_cache.shape[0]
    slots = [(ws - j) % L for j in range(n, 0, -1)]  # oldest first: positions 0..n-1
    k = torch.stack([k_cache[s] for s in slots] + [k_new]) + pe_k[: n + 1, None]  # (n+1, R, C)
    v = torch.stack([v_cache[s] for s in slots] + [v_new]) + pe_v[: n + 1, None]
    return attention(q[:, None], k.transpose(0, 1), v.transpose(0, 1), heads)[:, 0]


@pytest.mark.parametrize("write_slot,n_past", [(0, 0), (0, 3), (2, 3), (5, 5), (1, 2)])
def test_motion_attention_matches_dense(write_slot, n_past):
    g = torch.Generator().manual_seed(write_slot * 10 + n_past)
    L, R, C, P, heads = 6, 7, 16, 24, 2
    q, k_new, v_new = (torch.randn(R, C, generator=g) for _ in range(3))
    k_cache, v_cache = torch.randn(L, R, C, generator=g), torch.randn(L, R, C, generator=g)
    unused = [s for s in range(L) if not 1 <= (write_slot - s) % L <= n_past]
    k_cache[unused], v_cache[unused] = float("nan"), float("nan")  # never read
    pe_k, pe_v = torch.randn(P, C, generator=g), torch.randn(P, C, generator=g)
    ws, n = torch.tensor([write_slot], dtype=torch.int32), torch.tensor([n_past], dtype=torch.int32)
    out = motion_attention(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, ws, n, heads)
    ref = dense_reference(q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, ws, n, heads)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5


def test_motion_attention_matches_kernel_reference():
    """Same semantics as kernels/motion_attention.py's reference (which also writes the new slot)."""
    kref = pytest.importorskip("kernels.motion_attention").reference
    g = torch.Generator().manual_seed(0)
    L, R, C, heads = 16, 5, 32, 4
    args = [torch.randn(R, C, generator=g) for _ in range(3)] + \
           [torch.randn(L, R, C, generator=g) for _ in range(2)] + [torch.randn(24, C, generator=g) for _ in range(2)]
    for ws, n in ((3, 15), (15, 7), (0, 0)):
        counters = [torch.tensor([ws], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)]
        ours = motion_attention(*args, *counters, heads)
        theirs = kref(*args[:3], args[3].clone(), args[4].clone(), *args[5:], *counters, heads)
        assert rel(ours, theirs) < 1e-5, (ws, n)


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


def stream(unet, x, t, ctx, L, ref_kv=None, control=None):
    """Run frames one by one through StreamingUNet with the host ring protocol; returns eps per frame."""
    s = StreamingUNet(unet)
    kc, vc = alloc_ring(unet, L, 1, *HW)
    for c in (*kc, *vc):
        c.fill_(float("nan"))  # whatever the ring holds before it is written must not matter
    ws, n_past, eps = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), []
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


def test_ring_helpers(unet):
    kc, vc = alloc_ring(unet, 4, 2, *HW)
    layout = motion_layout(unet, *HW)
    assert len(kc) == len(vc) == len(layout) == 40 == StreamingUNet(unet).num_layers
    assert [tuple(k.shape) for k in kc] == [(4, 2 * n, c) for n, c in layout]
    ws, n_past = torch.tensor([3], dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    new = [torch.full(k.shape[1:], 7.0) for k in kc]
    ring_write(kc, vc, new, new, ws)
    assert all(bool((k[3] == 7).all()) and float(k[:3].abs().sum()) == 0 for k in kc)
    ring_advance(ws, n_past, 4)
    assert int(ws) == 0 and int(n_past) == 3
    ring_advance(ws, n_past, 4)
    assert int(ws) == 1 and int(n_past) == 3  # saturates at L - 1


def _bank_kv(unet, g):
    """Random (K_ref, V_ref) with the shapes of the 16 attn1 layers at HW (found with hooks)."""
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, a, out: shapes.append(tuple(a[0].shape[1:])))
             for m in unet.attn1_layers()]
    with torch.no_grad():
        unet(torch.zeros(1, 4, *HW), torch.zeros(1), torch.zeros(1, 77, 48), frames=1)
    for h in hooks:
        h.remove()
    return [(torch.randn(1, *s, generator=g), torch.randn(1, *s, generator=g)) for s in shapes]


def _control(unet, n, g):
    """13 residuals with the shapes of the skip connections (+ middle), from one forward pass."""
    shapes = []
    hooks = [b.register_forward_hook(lambda mod, a, out: shapes.append(tuple(out.shape[1:])))
             for b in (*unet.input_blocks, unet.middle_block)]
    with torch.no_grad():
        unet(torch.zeros(1, 4, *HW), torch.zeros(1), torch.zeros(1, 77, 48), frames=1)
    for h in hooks:
        h.remove()
    return [torch.randn(n, *s, generator=g) * 0.3 for s in shapes]


@torch.no_grad()
def test_stream_through_motion_kernel(unet):
    """use_kernels=True routes all 40 motion attentions through kernels/motion_attention.py (Triton;
    CPU interpreter here): same frames as the PyTorch op, ring wrapped, NaN-filled unwritten slots."""
    pytest.importorskip("triton", reason="Triton is a test extra: pip install -e .[test]")
    x, t, ctx, _ = inputs(5, seed=2)
    want = stream(unet, x, t, ctx, L=3)
    mods = [m for m in unet.modules() if isinstance(m, TemporalAttention)]
    for m in mods:
        m.use_kernels = True
    try:
        got = stream(unet, x, t, ctx, L=3)
    finally:
        for m in mods:
            m.use_kernels = False
    assert rel(got, want) < 1e-5
