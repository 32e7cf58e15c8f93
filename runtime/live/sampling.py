"""Few-step sampler maths for the live runtime, as one affine table per step.

Every sampler in models/samplers.py takes a step of the form

    x_next = A_i * x + B_i * eps + C_i * noise_i

(DDIM, LCM and TCD are all linear in x, eps and the re-noising noise). The table (A, B, C) is read
off the sampler itself by stepping with unit inputs, so the live runtime cannot drift from the
offline sampler, and a host in another language needs three numbers per step (the manifest carries
them). With the table, a step-staggered batch (elements at different steps) is one broadcast
multiply-add with per-element coefficients, and nothing in a step needs the host.

The initial latent of every frame is constant per source with fixed noise (the "official" init:
the source latent noised to t = 999, models/samplers.initial_latent), so it is computed once per
source, not per frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.samplers import make_sampler

LIVE_SAMPLERS = ("lcm", "tcd", "ddim")


@dataclass(frozen=True)
class StepTable:
    timesteps: torch.Tensor  # (S,) int64, use order (noisiest first)
    a: torch.Tensor          # (S,) float32 coefficient of x
    b: torch.Tensor          # (S,) float32 coefficient of eps
    c: torch.Tensor          # (S,) float32 coefficient of the step's noise (0 where none)

    def __len__(self) -> int:
        return self.timesteps.numel()

    def as_dict(self) -> dict:
        return {"timesteps": self.timesteps.tolist(), "x": self.a.tolist(), "eps": self.b.tolist(),
                "noise": self.c.tolist()}


def step_table(sampler_name: str, alphas_cumprod: torch.Tensor, steps: int, gamma: float = 0.3) -> StepTable:
    """(A, B, C) per step of a sampler from models/samplers.py, measured with unit inputs.

    Each sampler step is affine with no constant term; stepping with (x, eps, noise) = unit vectors
    reads the three coefficients exactly (float32 arithmetic of the sampler itself).
    """
    if sampler_name not in LIVE_SAMPLERS:
        raise ValueError(f"--sampler {sampler_name!r} is not a live sampler; choose one of {', '.join(LIVE_SAMPLERS)}")
    sampler = make_sampler(sampler_name, alphas_cumprod, steps, gamma)
    one, zero = torch.ones(1), torch.zeros(1)
    a, b, c = [], [], []
    for i in range(len(sampler)):
        noisy = sampler.needs_noise(i)
        a.append(sampler.step(zero, i, one, zero if noisy else None).prev)
        b.append(sampler.step(one, i, zero, zero if noisy else None).prev)
        c.append(sampler.step(zero, i, zero, one).prev if noisy else zero)
    return StepTable(sampler.timesteps.long().clone(), torch.cat(a), torch.cat(b), torch.cat(c))


def initial_latent(alphas_cumprod: torch.Tensor, source_latent: torch.Tensor, noise: torch.Tensor,
                   mode: str = "official") -> torch.Tensor:
    """x_T of every frame: the source latent noised to t = T-1 ('official') or pure noise ('noise')."""
    from models.samplers import initial_latent as offline_initial_latent
    return offline_initial_latent(alphas_cumprod.to(source_latent.device), source_latent, noise, mode)
