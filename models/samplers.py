"""Sampler math, kept out of the nn.Modules (style rule 7): per-step coefficients precomputed as
tensors at construction, `step(eps, i, x)` pure tensor arithmetic, no model calls.

DDIM follows the official DDIMSampler_ReferenceOnly (spec §6.2): "uniform" spacing
range(0, T, T // S) + 1 (so S=30 gives 31 evaluations), a_prev of the last step = abar[0], eta 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


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
