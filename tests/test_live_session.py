"""The live session (runtime/live/session.py) on the tiny preset, CPU.

Properties a live system needs, each checked against an independent computation:
* the per-step affine table equals the offline samplers' own step;
* the stream batch (StreamDiffusion's schedule) gives frame for frame what the sequential schedule gives;
* reset() forgets the temporal history completely; a source swap recomputes only per-source caches;
* the temporal window is honoured (window 0 ignores the history; a longer window uses it);
* the torch backend and ONNX Runtime over the exported graphs give the same streamed frames;
* the per-frame work writes the rings in place (persistent buffers, no re-allocation).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.live.config import LiveConfig
from runtime.live.factory import load_live
from runtime.live.sampling import step_table

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = 5


@pytest.fixture(scope="module")
def live():
    return load_live(LiveConfig.from_name("tiny", steps=2, window=3))


def _frames(n: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Driving hints that change smoothly from frame to frame (uint8, like the tracker's)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (size, size, 3), generator=g).float()
    out = []
    for k in range(n):
        pose = (base.roll(2 * k, dims=1) * 0.9 + 10 * k).clamp(0, 255).to(torch.uint8)
        local = torch.zeros_like(pose)
        local[size // 4:size // 2, size // 4:size // 2] = pose[size // 4:size // 2, size // 4:size // 2]
        out.append((pose, local))
    return out


def _source(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _run(session, frames) -> list[tuple[int, np.ndarray]]:
    out = []
    for k, (pose, local) in enumerate(frames):
        res = session.step(pose, local, tag=k)
        if res is not None:
            out.append((res.tag, res.image.numpy().copy()))
    return out


@pytest.mark.parametrize("name,steps", [("lcm", 1), ("lcm", 4), ("tcd", 3), ("ddim", 2)])
def test_step_table_equals_sampler_step(name, steps):
    from models.samplers import make_sampler
    from models.schedule import ddpm_buffers
    from models.config import XPortraitConfig
    ac = ddpm_buffers(XPortraitConfig.from_name("tiny").schedule)["alphas_cumprod"]
    table, sampler = step_table(name, ac, steps), make_sampler(name, ac, steps)
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        x, eps, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        want = sampler.step(eps, i, x, noise if sampler.needs_noise(i) else None).prev
        got = table.a[i] * x + table.b[i] * eps + table.c[i] * noise
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (table.c[i] != 0) == sampler.needs_noise(i)
    assert table.timesteps.tolist() == sampler.timesteps.tolist()


def test_stream_batch_equals_sequential(live):
    size = live.cfg.image_size()
    frames = _frames(FRAMES, size)
    seq = live.new_session()
    seq.set_source(_source(size))
    batched = live.new_session(stream_batch=True)
    batched.set_source(_source(size))
    a, b = _run(seq, frames), _run(batched, frames)
    S = seq.steps
    assert [t for t, _ in a] == list(range(FRAMES))
    assert [t for t, _ in b] == list(range(FRAMES - S + 1)), "stream batch delays each frame by S-1 calls"
    for (ta, ia), (tb, ib) in zip(a, b):
        assert ta == tb
        assert np.abs(ia.astype(int) - ib.astype(int)).max() <= 1, f"frame {ta}"
    assert not all(np.array_equal(a[0][1], x) for _, x in a[1:]), "frames should differ"


def test_reset_forgets_history_and_swap_keeps_it(live):
    size = live.cfg.image_size()
    frames = _frames(FRAMES, size)
    s = live.new_session()
    s.set_source(_source(size))
    _run(s, frames[:3])
    s.reset()
    after_reset = _run(s, frames[3:])
    fresh = live.new_session()
    fresh.set_source(_source(size))
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(after_reset, _run(fresh, frames[3:])))

    # a swap recomputes the per-source caches and keeps the temporal rings (counters go on)
    s2 = live.new_session()
    s2.set_source(_source(size))
    _run(s2, frames[:3])
    n_past = s2.n_past.clone()
    s2.set_source(_source(size, seed=7))
    assert torch.equal(s2.n_past, n_past)
    ref = live.new_session()
    ref.set_source(_source(size, seed=7))
    torch.testing.assert_close(s2.z_src, ref.z_src)
    for mine, theirs in zip(s2.ref, ref.ref):
        for n in mine:
            torch.testing.assert_close(mine[n], theirs[n])
    swapped = _run(s2, frames[3:4])[0][1]
    s2.reset()
    assert not np.array_equal(swapped, _run(s2, frames[3:4])[0][1]), "the history must matter after a swap"


def test_window_zero_ignores_history():
    live0 = load_live(LiveConfig.from_name("tiny", steps=1, window=0))
    size = live0.cfg.image_size()
    frames = _frames(3, size)
    s = live0.new_session()
    s.set_source(_source(size))
    assert s.memory()["rings"] == 0
    warm = _run(s, frames)[-1][1]
    cold = live0.new_session()
    cold.set_source(_source(size))
    assert np.array_equal(warm, _run(cold, frames[-1:])[0][1]), "window 0: the last frame ignores the history"


def test_history_changes_the_frame(live):
    size = live.cfg.image_size()
    frames = _frames(3, size)
    s = live.new_session()
    s.set_source(_source(size))
    warm = _run(s, frames)[-1][1]
    cold = live.new_session()
    cold.set_source(_source(size))
    assert not np.array_equal(warm, _run(cold, frames[-1:])[0][1]), "window 3: the history must matter"


def test_rings_are_written_in_place(live):
    size = live.cfg.image_size()
    s = live.new_session()
    s.set_source(_source(size))
    ptrs = [t.data_ptr() for t in (*s.k_ring, *s.v_ring, s.x, s.x_in, s.write_slot, s.n_past)]
    before = s.k_ring[0].clone()
    _run(s, _frames(2, size))
    assert ptrs == [t.data_ptr() for t in (*s.k_ring, *s.v_ring, s.x, s.x_in, s.write_slot, s.n_past)]
    assert not torch.equal(before, s.k_ring[0])
    assert s.write_slot.tolist() == [2, 2] and s.n_past.tolist() == [2, 2]


def test_config_errors_name_the_flag():
    for kw, flag in (({"steps": 0}, "--steps"), ({"window": 16}, "--window"), ({"resolution": 100}, "--resolution"),
                     ({"backend": "x"}, "--backend"), ({"sampler": "euler"}, "--sampler")):
        with pytest.raises(ValueError, match=flag):
            LiveConfig.from_name("tiny", **kw).validated()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from export.__main__ import export_all
    from export.spec import ExportOptions
    out = tmp_path_factory.mktemp("live_export")
    opts = ExportOptions(latent_hw=(16, 16), slots=4)
    modules = ("vae_encoder", "reference", "hint", "control", "unet_stream", "taesd_decoder")
    return export_all("tiny", out, ("fp32",), modules, opts, log=lambda s: None)["fp32"]


def test_torch_and_onnxruntime_stream_the_same_frames(exported):
    cfg = LiveConfig.from_name("tiny", steps=2, window=3)
    torch_live, ort_live = load_live(cfg), load_live(LiveConfig.from_name("tiny", steps=2, window=3, backend="ort"),
                                                       engines=exported)
    size = cfg.image_size()
    frames = _frames(4, size)
    runs = []
    for live in (torch_live, ort_live):
        s = live.new_session()
        s.set_source(_source(size))
        runs.append((_run(s, frames), s))
    (a, sa), (b, sb) = runs
    assert len(a) == len(b) == 4
    for (_, x), (_, y) in zip(a, b):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 2  # uint8 after fp32 graphs: rounding only
    torch.testing.assert_close(sa.k_ring[5], sb.k_ring[5], rtol=1e-4, atol=1e-4)
    assert torch.equal(sa.n_past, sb.n_past)


def test_onnx_window_must_match_export(exported):
    with pytest.raises(ValueError, match="--window"):
        load_live(LiveConfig.from_name("tiny", window=7, backend="ort"), engines=exported).new_session()


def test_fp8_ring_halves_memory_and_stays_close(live):
    live8 = load_live(LiveConfig.from_name("tiny", steps=2, window=3, ring_dtype="fp8"))
    size = live.cfg.image_size()
    frames = _frames(3, size)
    runs = []
    for lv in (live, live8):
        s = lv.new_session()
        s.set_source(_source(size))
        runs.append((_run(s, frames), s.memory()["rings"]))
    (a, ring32), (b, ring8) = runs
    assert ring8 * 4 == ring32  # fp32 -> fp8 storage
    diff = max(np.abs(x.astype(int) - y.astype(int)).mean() for (_, x), (_, y) in zip(a, b))
    assert 0 < diff < 8, diff  # rounded K/V: close to, but not the same as, the fp32 ring


def test_nonfinite_weights_are_reported_with_the_likely_cause():
    from models.finite import NonFiniteError
    bad = load_live(LiveConfig.from_name("tiny", steps=1, window=0))
    unet = bad.graphs.runners["unet_stream"].stream.unet
    with torch.no_grad():
        next(unet.parameters()).fill_(float("nan"))  # a corrupt checkpoint
    s = bad.new_session()
    size = bad.cfg.image_size()
    s.set_source(_source(size))
    assert s.finite.poll() is None
    _run(s, _frames(1, size))
    err = s.finite.poll()
    assert isinstance(err, NonFiniteError) and "fp16" in str(err) and "checkpoint" in str(err)
