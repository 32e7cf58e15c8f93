"""Sampler math, kept out of the nn.Modules (style rule 7): per-step coefficients precomputed as
tensors at construction, `step(eps, i, x, noise=None) -> StepOutput` pure tensor arithmetic, no
model calls. Every sampler has `timesteps` (use order, noisiest first), `len()` and `needs_noise(i)`.

* DDIM follows the official DDIMSampler_ReferenceOnly (spec §6.2): "uniform" spacing
  range(0, T, T // S) + 1 (so S=30 gives 31 evaluations), a_prev of the last step = abar[0], eta 0.
* LCM (1-8 steps typical) and TCD use the LCM grid t_i = 999 - 20 floor(50 i / N)
  (../shared/docs/depth-lcm-taesd.md §2.2-2.6).
* `initial_latent` builds x_T (official: source latent noised to t=999; or pure noise),
  `step_noise_fn` supplies the between-step noise (fresh or fixed, optionally one tensor shared
  by all frames).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from models.schedule import q_sample


@dataclass
class StepOutput:
    prev: torch.Tensor     # latent entering the next step (or the final latent)
    pred_x0: torch.Tensor  # the step's denoised estimate


def ddim_timesteps(steps: int, train_steps: int = 1000) -> torch.Tensor:
    """Official 'uniform' DDIM timesteps, in the order they are used (descending)."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"DDIM steps must be in [1, {train_steps}], got {steps}")
    c = train_steps // steps
    return (torch.arange(0, train_steps, c) + 1).flip(0)


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_uncond + scale * (eps_cond - eps_uncond)


class DDIM:
    """Deterministic (eta=0) or stochastic DDIM over the official timestep grid."""

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int, eta: float = 0.0):
        ac = alphas_cumprod.float().cpu()
        self.timesteps = ddim_timesteps(steps, ac.shape[0])
        ascending = self.timesteps.flip(0)
        a = ac[ascending]
        a_prev = torch.cat([ac[:1], ac[ascending[:-1]]])
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        # stored in use order (index 0 = first, noisiest step)
        self.alphas, self.alphas_prev, self.sigmas = a.flip(0), a_prev.flip(0), sigma.flip(0)
        self.eta = eta

    def __len__(self) -> int:
        return len(self.timesteps)

    def needs_noise(self, i: int) -> bool:
        return self.eta > 0

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None = None) -> StepOutput:
        a, a_prev, sigma = self.alphas[i], self.alphas_prev[i], self.sigmas[i]
        pred_x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        prev = a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
        if self.eta > 0:
            if noise is None:
                raise ValueError("DDIM with eta > 0 needs a noise tensor for each step")
            prev = prev + sigma * noise
        return StepOutput(prev, pred_x0)


def run_sampler(sampler, x: torch.Tensor, eps_fn: Callable[[torch.Tensor, int, int], torch.Tensor],
                on_step: Callable[[int, torch.Tensor, torch.Tensor, StepOutput], None] | None = None,
                noise_fn: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """Generic loop: eps_fn(x, t, i) -> eps; returns the final latent."""
    for i, t in enumerate(sampler.timesteps.tolist()):
        eps = eps_fn(x, t, i)
        out = sampler.step(eps, i, x, None if noise_fn is None else noise_fn(i))
        if on_step is not None:
            on_step(i, x, eps, out)
        x = out.prev
    return x


# ------------------------------------------------------------------------------ few-step samplers
def lcm_timesteps(steps: int, original_steps: int = 50, train_steps: int = 1000) -> torch.Tensor:
    """LCM/TCD grid (depth-lcm-taesd.md §2.2): t_i = (T-1) - k*floor(original_steps*i/steps), k = T/original_steps.

    With the defaults, t_i = 999 - 20*floor(50 i / N): N=4 gives 999, 759, 499, 259.
    """
    if not 1 <= steps <= original_steps:
        raise ValueError(f"LCM/TCD steps must be in [1, {original_steps}], got {steps}")
    k = train_steps // original_steps
    idx = torch.arange(steps) * original_steps // steps  # floor(original_steps * i / steps)
    return (train_steps - 1) - k * idx


def lcm_boundary(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Consistency-model boundary scalings (c_skip, c_out) at integer timesteps t (§2.3)."""
    st = timestep_scaling * t.double()
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / (st ** 2 + sigma_data ** 2).sqrt()
    return c_skip.float(), c_out.float()


def _sqrt_pair(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = a.double()
    return a.sqrt().float(), (1 - a).sqrt().float()


class LCM:
    """Latent Consistency Model sampler (eps-prediction), depth-lcm-taesd.md §2.4.

    Step i: x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t); denoised = c_out x0 + c_skip x; then, unless
    it is the last step, re-noise to the next grid timestep with `noise` (fresh per step in the
    reference scheduler, one fixed tensor in StreamDiffusion's stream batch; the caller decides).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int, original_steps: int = 50):
        ac = alphas_cumprod.double().cpu()
        self.timesteps = lcm_timesteps(steps, original_steps, ac.shape[0])
        nxt = torch.cat([self.timesteps[1:], self.timesteps[-1:]])  # last entry unused (no re-noise)
        self.sqrt_a, self.sqrt_1ma = _sqrt_pair(ac[self.timesteps])
        self.sqrt_a_next, self.sqrt_1ma_next = _sqrt_pair(ac[nxt])
        self.c_skip, self.c_out = lcm_boundary(self.timesteps)

    def __len__(self) -> int:
        return len(self.timesteps)

    def needs_noise(self, i: int) -> bool:
        return i < len(self) - 1

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None = None) -> StepOutput:
        pred_x0 = (x - self.sqrt_1ma[i] * eps) / self.sqrt_a[i]
        denoised = self.c_out[i] * pred_x0 + self.c_skip[i] * x
        if not self.needs_noise(i):
            return StepOutput(denoised, denoised)
        if noise is None:
            raise ValueError("LCM re-noises between steps: pass a noise tensor for every step but the last")
        return StepOutput(self.sqrt_a_next[i] * denoised + self.sqrt_1ma_next[i] * noise, denoised)


class TCD:
    """Trajectory Consistency Distillation sampler (depth-lcm-taesd.md §2.6), LCM grid.

    gamma (diffusers' `eta`) sets the stochasticity: s = floor((1-gamma) t_prev); DDIM jump from t
    to s, then (gamma > 0, not the last step) forward-noise from s back up to t_prev. gamma = 0 is
    a DDIM jump t -> t_prev on the LCM grid; t_prev of the last step is 0.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int, gamma: float = 0.3, original_steps: int = 50):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"TCD gamma must be in [0, 1], got {gamma}")
        ac = alphas_cumprod.double().cpu()
        self.timesteps = lcm_timesteps(steps, original_steps, ac.shape[0])
        t_prev = torch.cat([self.timesteps[1:], torch.zeros(1, dtype=torch.long)])
        self.s = torch.floor((1 - gamma) * t_prev.double()).long()
        self.gamma = gamma
        self.sqrt_a, self.sqrt_1ma = _sqrt_pair(ac[self.timesteps])
        self.sqrt_a_s, self.sqrt_1ma_s = _sqrt_pair(ac[self.s])
        ratio = ac[t_prev] / ac[self.s]  # abar_{t_prev} / abar_s <= 1
        self.renoise_scale, self.renoise_noise = ratio.sqrt().float(), (1 - ratio).sqrt().float()

    def __len__(self) -> int:
        return len(self.timesteps)

    def needs_noise(self, i: int) -> bool:
        return self.gamma > 0 and i < len(self) - 1

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None = None) -> StepOutput:
        pred_x0 = (x - self.sqrt_1ma[i] * eps) / self.sqrt_a[i]
        x_s = self.sqrt_a_s[i] * pred_x0 + self.sqrt_1ma_s[i] * eps
        if not self.needs_noise(i):
            return StepOutput(x_s, pred_x0)
        if noise is None:
            raise ValueError("TCD with gamma > 0 needs a noise tensor for every step but the last")
        return StepOutput(self.renoise_scale[i] * x_s + self.renoise_noise[i] * noise, pred_x0)


SAMPLERS = ("ddim", "lcm", "tcd")


def make_sampler(name: str, alphas_cumprod: torch.Tensor, steps: int, gamma: float = 0.3):
    """Build a sampler by name: 'ddim' (official grid, eta 0), 'lcm', 'tcd' (gamma = TCD eta)."""
    if name == "ddim":
        return DDIM(alphas_cumprod, steps)
    if name == "lcm":
        return LCM(alphas_cumprod, steps)
    if name == "tcd":
        return TCD(alphas_cumprod, steps, gamma)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


# ---------------------------------------------------------------------------------- noise helpers
def draw_noise(frames: int, shape: tuple[int, ...], generator: torch.Generator, shared: bool = False,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(frames, *shape) standard normal noise; `shared` draws one tensor and repeats it per frame.

    Drawn on the CPU from `generator`, so a seed gives the same pictures on every device.
    """
    n = 1 if shared else frames
    noise = torch.randn((n, *shape), generator=generator, dtype=torch.float32)
    return noise.expand(frames, *shape).contiguous().to(device) if shared else noise.to(device)


def step_noise_fn(sampler, frames: int, shape: tuple[int, ...], generator: torch.Generator,
                  mode: str = "fresh", shared: bool = False, device: torch.device | str = "cpu"
                  ) -> Callable[[int], torch.Tensor | None]:
    """noise_fn for run_sampler: None where the sampler takes no noise, else

    'fresh': a new draw per step (the LCM/TCD reference schedulers);
    'fixed': one draw reused at every step (StreamDiffusion's stream batch; steadier video).
    """
    if mode not in ("fresh", "fixed"):
        raise ValueError(f"noise mode must be 'fresh' or 'fixed', got {mode!r}")
    fixed: list[torch.Tensor] = []

    def noise_fn(i: int) -> torch.Tensor | None:
        if not getattr(sampler, "needs_noise", lambda _: False)(i):
            return None
        if mode == "fresh":
            return draw_noise(frames, shape, generator, shared, device)
        if not fixed:
            fixed.append(draw_noise(frames, shape, generator, shared, device))
        return fixed[0]
    return noise_fn


INIT_MODES = ("official", "noise")


def initial_latent(alphas_cumprod: torch.Tensor, source_latent: torch.Tensor, noise: torch.Tensor,
                   mode: str = "official") -> torch.Tensor:
    """x_T for every frame. noise: (F, 4, h, w); source_latent: (1 or F, 4, h, w).

    'official': q_sample(source latent, t = T-1 = 999, noise), as test_xportrait.py does (spec §6.4)
        whatever the sampler's first timestep. We keep 999 rather than the sampler's first t
        because (a) it is what the official run (and the golden DDIM run) does, (b) for LCM/TCD
        the first t *is* 999, and (c) for the official 30-step DDIM the first t is 991, where the
        difference is negligible. Few-step DDIM (e.g. 4 steps start at t=751) then starts from a
        latent noisier than the model expects: use LCM/TCD grids for few steps (spec §6.2).
    'noise': pure Gaussian noise; no trace of the source in x_T.
    """
    if mode == "noise":
        return noise.clone()
    if mode != "official":
        raise ValueError(f"init mode must be one of {INIT_MODES}, got {mode!r}")
    return q_sample(alphas_cumprod, source_latent.expand_as(noise), alphas_cumprod.shape[0] - 1, noise)
