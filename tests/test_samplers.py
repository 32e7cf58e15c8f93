"""Sampler math (models/samplers.py) against formulas recomputed here in float64 numpy, and the
three samplers end to end on the tiny preset (runtime.pipeline.animate, random weights)."""
import math

import numpy as np
import pytest
import torch

from models.samplers import (DDIM, LCM, TCD, draw_noise, initial_latent, lcm_boundary, lcm_timesteps, make_sampler,
                             step_noise_fn)
from models.config import ScheduleConfig
from models.schedule import ddpm_buffers

# depth-lcm-taesd.md §2.2 table, copied by hand
LCM_TABLE = {
    1: [999],
    2: [999, 499],
    3: [999, 679, 339],
    4: [999, 759, 499, 259],
    5: [999, 799, 599, 399, 199],
    6: [999, 839, 679, 499, 339, 179],
    7: [999, 859, 719, 579, 439, 299, 159],
    8: [999, 879, 759, 639, 499, 379, 259, 139],
}


def abar_np() -> np.ndarray:
    """LDM 'linear' schedule, spec §6.1, in float64."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@pytest.fixture(scope="module")
def ac() -> torch.Tensor:
    return ddpm_buffers(ScheduleConfig())["alphas_cumprod"]


def close(a: torch.Tensor, b, tol: float = 2e-5) -> bool:
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    return bool(((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-12)) < tol)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_schedule_reference_values(ac):
    a = abar_np()
    assert np.allclose(ac.double().numpy(), a, rtol=1e-6)
    assert abs(a[0] - 0.99915) < 1e-5 and abs(a[999] - 0.004660) < 1e-5
    assert abs(math.sqrt(a[999]) - 0.0683) < 1e-4 and abs(math.sqrt(1 - a[999]) - 0.9977) < 1e-4


@pytest.mark.parametrize("steps,expected", [(1, [1]), (2, [501, 1]), (4, [751, 501, 251, 1])])
def test_ddim_official_timesteps(steps, expected):
    assert DDIM(torch.ones(1000) * 0.5, steps).timesteps.tolist() == expected


def test_ddim_30_steps_gives_31_evaluations():
    ts = DDIM(torch.linspace(0.99, 0.01, 1000), 30).timesteps.tolist()
    assert len(ts) == 31 and ts[:3] == [991, 958, 925] and ts[-2:] == [34, 1]


def test_ddim_step_formula(ac):
    a = abar_np()
    s = DDIM(ac, 4)
    x, eps = rand(2, 4, 8, 8, seed=1).double(), rand(2, 4, 8, 8, seed=2).double()
    for i, (t, t_prev) in enumerate(zip([751, 501, 251, 1], [501, 251, 1, None])):
        a_t, a_p = a[t], (a[t_prev] if t_prev is not None else a[0])
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        out = s.step(eps.float(), i, x.float())
        assert close(out.pred_x0, x0) and close(out.prev, math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps)


@pytest.mark.parametrize("n", range(1, 9))
def test_lcm_timesteps_match_table(n):
    assert lcm_timesteps(n).tolist() == LCM_TABLE[n]
    assert lcm_timesteps(n).tolist() == [999 - 20 * math.floor(50 * i / n) for i in range(n)]
    assert LCM(torch.ones(1000) * 0.5, n).timesteps.tolist() == LCM_TABLE[n]
    assert TCD(torch.ones(1000) * 0.5, n).timesteps.tolist() == LCM_TABLE[n]


def test_lcm_timesteps_reject_bad_counts():
    with pytest.raises(ValueError):
        lcm_timesteps(0)
    with pytest.raises(ValueError):
        lcm_timesteps(51)


def test_boundary_scalings():
    ts = torch.tensor([999, 259, 19, 0])
    c_skip, c_out = lcm_boundary(ts)
    for t, cs, co in zip(ts.tolist(), c_skip.tolist(), c_out.tolist()):
        assert math.isclose(cs, 0.25 / ((10 * t) ** 2 + 0.25), rel_tol=1e-5)
        assert math.isclose(co, 10 * t / math.sqrt((10 * t) ** 2 + 0.25), rel_tol=1e-6, abs_tol=1e-12)
    assert math.isclose(c_skip[0].item(), 2.5e-9, rel_tol=0.01)
    assert math.isclose(c_skip[1].item(), 3.7e-8, rel_tol=0.02)
    assert math.isclose(c_skip[2].item(), 6.9e-6, rel_tol=0.02)
    assert (c_out[:3] - 1).abs().max() < 4e-6
    assert c_skip[3] == 1 and c_out[3] == 0  # t = 0: the consistency function is the identity


def test_lcm_step_formula(ac):
    a = abar_np()
    s = LCM(ac, 4)
    x, eps, z = (rand(2, 4, 8, 8, seed=k).double() for k in (3, 4, 5))
    grid = LCM_TABLE[4]
    for i, t in enumerate(grid):
        st = 10.0 * t
        c_skip, c_out = 0.25 / (st ** 2 + 0.25), st / math.sqrt(st ** 2 + 0.25)
        x0 = (x - math.sqrt(1 - a[t]) * eps) / math.sqrt(a[t])
        den = c_out * x0 + c_skip * x
        last = i == len(grid) - 1
        assert s.needs_noise(i) == (not last)
        out = s.step(eps.float(), i, x.float(), None if last else z.float())
        assert close(out.pred_x0, den)
        if last:
            assert close(out.prev, den)
        else:
            tn = grid[i + 1]
            assert close(out.prev, math.sqrt(a[tn]) * den + math.sqrt(1 - a[tn]) * z)


def test_lcm_needs_noise_between_steps(ac):
    s = LCM(ac, 2)
    with pytest.raises(ValueError, match="noise"):
        s.step(rand(1, 4, 4, 4), 0, rand(1, 4, 4, 4))
    one = LCM(ac, 1)  # one step: x0 at t = 999 (times c_out ~ 1), no noise needed
    x, eps = rand(1, 4, 4, 4, seed=1), rand(1, 4, 4, 4, seed=2)
    a = abar_np()[999]
    assert close(one.step(eps, 0, x).prev, (x.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a), 1e-4)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_tcd_gamma0_is_ddim_jump(ac, n):
    a = abar_np()
    s = TCD(ac, n, gamma=0.0)
    grid = LCM_TABLE[n] + [0]
    x, eps = rand(2, 4, 8, 8, seed=7).double(), rand(2, 4, 8, 8, seed=8).double()
    for i in range(n):
        assert not s.needs_noise(i)
        t, tp = grid[i], grid[i + 1]
        x0 = (x - math.sqrt(1 - a[t]) * eps) / math.sqrt(a[t])
        out = s.step(eps.float(), i, x.float())
        assert close(out.prev, math.sqrt(a[tp]) * x0 + math.sqrt(1 - a[tp]) * eps)


def test_tcd_stochastic_step_formula(ac):
    a = abar_np()
    gamma = 0.3
    s = TCD(ac, 4, gamma=gamma)
    grid = LCM_TABLE[4] + [0]
    x, eps, z = (rand(2, 4, 8, 8, seed=k).double() for k in (9, 10, 11))
    for i in range(4):
        t, tp = grid[i], grid[i + 1]
        sv = math.floor((1 - gamma) * tp)
        x0 = (x - math.sqrt(1 - a[t]) * eps) / math.sqrt(a[t])
        xs = math.sqrt(a[sv]) * x0 + math.sqrt(1 - a[sv]) * eps
        last = i == 3
        expected = xs if last else math.sqrt(a[tp] / a[sv]) * xs + math.sqrt(1 - a[tp] / a[sv]) * z
        assert s.needs_noise(i) == (not last)
        assert close(s.step(eps.float(), i, x.float(), None if last else z.float()).prev, expected)
    with pytest.raises(ValueError):
        TCD(ac, 4, gamma=1.5)


def test_make_sampler(ac):
    assert isinstance(make_sampler("ddim", ac, 2), DDIM)
    assert isinstance(make_sampler("lcm", ac, 2), LCM)
    assert make_sampler("tcd", ac, 2, gamma=0.5).gamma == 0.5
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler", ac, 2)


def test_initial_latent(ac):
    a = abar_np()[999]
    z, n = rand(1, 4, 8, 8, seed=12), rand(3, 4, 8, 8, seed=13)
    x = initial_latent(ac, z, n, "official")
    assert x.shape == n.shape
    assert close(x, math.sqrt(a) * z.double() + math.sqrt(1 - a) * n.double())
    assert torch.equal(initial_latent(ac, z, n, "noise"), n)
    with pytest.raises(ValueError):
        initial_latent(ac, z, n, "facevid2vid")


def test_noise_helpers(ac):
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    shared = draw_noise(4, (4, 8, 8), g(), shared=True)
    assert shared.shape == (4, 4, 8, 8) and all(torch.equal(shared[0], shared[k]) for k in range(4))
    own = draw_noise(4, (4, 8, 8), g())
    assert not torch.equal(own[0], own[1]) and torch.equal(own, draw_noise(4, (4, 8, 8), g()))
    s = LCM(ac, 3)
    fresh, fixed = step_noise_fn(s, 2, (4, 8, 8), g(), "fresh"), step_noise_fn(s, 2, (4, 8, 8), g(), "fixed")
    assert not torch.equal(fresh(0), fresh(1)) and fresh(2) is None
    assert torch.equal(fixed(0), fixed(1)) and fixed(2) is None
    assert step_noise_fn(DDIM(ac, 2), 2, (4, 8, 8), g())(0) is None  # eta 0: no noise drawn


# ----------------------------------------------------------------------- end to end, tiny preset
@pytest.fixture(scope="module")
def tiny():
    from runtime.pipeline import load_models
    return load_models("tiny", seed=0)


@pytest.mark.parametrize("sampler,steps", [("ddim", 2), ("lcm", 2), ("tcd", 2)])
def test_samplers_end_to_end_tiny(tiny, sampler, steps):
    from runtime.pipeline import SamplingConfig, animate
    from runtime.windows import WindowSpec
    n, r = 3, 128  # tiny needs latent >= 16: its 32-channel GroupNorm(32) at 1x1 would see one value
    g = torch.Generator().manual_seed(1)
    src = torch.rand(1, 3, r, r, generator=g) * 2 - 1
    hint = torch.rand(n, 3, r, r, generator=g) * 2 - 1
    cfg = SamplingConfig(sampler=sampler, steps=steps, window=WindowSpec(2, 1))  # 2-frame windows: overlap path
    res = animate(tiny.model, tiny.context, src, hint, hint, cfg)
    assert res.latents.shape == (n, 4, r // 8, r // 8) and torch.isfinite(res.latents).all()
    assert res.images.shape == (n, 3, r, r) and res.images.abs().max() <= 1
    assert res.config.cfg_scale == (5.0 if sampler == "ddim" else 1.0)
