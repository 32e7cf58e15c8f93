"""Temporal windows (runtime/windows.py): coverage, averaging weights, brute-force parity,
determinism, and the spec §5.2 edge cases that the official code gets wrong."""
import math

import pytest
import torch

from runtime.windows import WindowSchedule, WindowSpec, coverage, plan, windowed

LENGTHS = [1, 15, 16, 17, 40]


def official_starts(n: int, size: int, overlap: int, offset: int) -> list[int]:
    """The official start loop (ddim.py:500-549, spec §5.2), for N > size where it is sound."""
    starts, s = [], offset
    while s < offset + n - overlap:
        starts.append(s)
        s += size - overlap
    return starts


def fake_eps(xw: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Depends on the window's content and on each frame's slot, like the motion modules do."""
    pos = torch.arange(len(idx), dtype=xw.dtype).view(-1, 1, 1, 1)
    return xw * 0.5 + pos * 0.1 + xw.mean() + float(idx[0]) * 0.01


def brute_force(x: torch.Tensor, windows: list[torch.Tensor]) -> torch.Tensor:
    out = []
    for f in range(x.shape[0]):
        vals = []
        for idx in windows:
            e = fake_eps(x[idx], idx)
            vals += [e[p] for p in range(len(idx)) if int(idx[p]) == f]
        out.append(torch.stack(vals).mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("offset", [0, 5, 39])
def test_every_frame_covered_without_duplicates(n, offset):
    wins = plan(n, 16, 4, offset)
    assert all(len(w) == min(16, n) and len(set(w.tolist())) == len(w) for w in wins)
    assert set(torch.cat(wins).tolist()) == set(range(n))
    assert coverage(wins, n).min() >= 1


@pytest.mark.parametrize("n", [17, 40, 100])
@pytest.mark.parametrize("offset", [0, 3, 16])
def test_long_clips_follow_the_official_scheme(n, offset):
    wins = plan(n, 16, 4, offset)
    starts = official_starts(n, 16, 4, offset % n)
    assert len(wins) == len(starts) == math.ceil((n - 4) / 12)
    for w, s in zip(wins, starts):
        assert w.tolist() == [(s + k) % n for k in range(16)]


def test_averaging_weights():
    assert coverage(plan(17, 16, 4), 17).tolist() == [2] * 11 + [1] + [2] * 4 + [1]
    assert coverage(plan(40, 16, 4), 40).tolist() == [1] * 12 + [2] * 4 + [1] * 8 + [2] * 4 + [1] * 12
    for n in (1, 15, 16):
        assert coverage(plan(n, 16, 4), n).tolist() == [1] * n


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("offset", [0, 7])
def test_windowed_matches_brute_force(n, offset):
    x = torch.randn(n, 4, 2, 2, generator=torch.Generator().manual_seed(n))
    wins = plan(n, 16, 4, offset)
    got = windowed(fake_eps, x, wins)
    assert torch.allclose(got, brute_force(x, wins), atol=1e-6)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("n", LENGTHS)
def test_identity_eps_is_preserved(n):
    x = torch.randn(n, 4, 3, 3)
    assert torch.allclose(windowed(lambda xw, idx: xw, x, plan(n, 16, 4, 3)), x, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_short_clips_have_one_natural_window(n):
    """Official: N <= num_mix builds no window (NaN), N < 16 repeats indices. Here: one window."""
    for offset in (0, 1, 3):
        assert [w.tolist() for w in plan(n, 16, 4, offset)] == [list(range(n))]


def test_duplicate_indices_accumulate():
    """A hand-made window list with a repeated frame: both contributions count (official drops one)."""
    x = torch.zeros(2, 1, 1, 1)
    eps = lambda xw, idx: torch.arange(len(idx), dtype=torch.float32).view(-1, 1, 1, 1)  # noqa: E731
    out = windowed(eps, x, [torch.tensor([0, 1, 0])])
    assert out.flatten().tolist() == [1.0, 1.0]  # frame 0: mean(0, 2); frame 1: 1
    with pytest.raises(ValueError, match="no window"):
        windowed(eps, x, [torch.tensor([0])])


def test_deterministic_and_random_offsets():
    fixed = WindowSchedule(WindowSpec(16, 4, "fixed"), 40)
    assert [fixed.offset(i) for i in range(5)] == [0] * 5
    a, b = WindowSchedule(WindowSpec(16, 4, "random", seed=3), 40), WindowSchedule(WindowSpec(16, 4, "random", seed=3), 40)
    assert [w.tolist() for w in a.windows(4)] == [w.tolist() for w in b.windows(4)]  # any query order
    offs = [a.offset(i) for i in range(20)]
    assert offs == [b.offset(i) for i in range(20)] and len(set(offs)) > 1 and all(0 <= o < 40 for o in offs)
    c = WindowSchedule(WindowSpec(16, 4, "random", seed=4), 40)
    assert [c.offset(i) for i in range(20)] != offs


def test_window_spec_validation():
    for bad in (dict(size=0), dict(size=16, overlap=16), dict(overlap=-1), dict(offsets="sometimes")):
        with pytest.raises(ValueError):
            WindowSpec(**bad)
    assert WindowSpec().stride == 12
    with pytest.raises(ValueError):
        plan(0)


def test_zero_overlap_and_other_sizes():
    for n in (5, 20, 33):
        wins = plan(n, 4, 0)
        assert coverage(wins, n).min() >= 1 and all(len(w) == 4 for w in wins)
