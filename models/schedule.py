"""DDPM noise schedule (LDM register_schedule), spec §6.1.

Computed in float64 and stored in float32, like the official buffers (whose names are kept so
they load from, and can be checked against, official checkpoints).
"""
from __future__ import annotations

import torch

from models.config import ScheduleConfig

BUFFER_NAMES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "logvar")


def ddpm_buffers(cfg: ScheduleConfig) -> dict[str, torch.Tensor]:
    f64 = torch.float64
    betas = torch.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps, dtype=f64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=f64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    out = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        "logvar": torch.zeros(cfg.timesteps, dtype=f64),
    }
    return {k: v.float() for k, v in out.items()}


def q_sample(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (official x_T construction uses t = 999)."""
    a = alphas_cumprod[t].double()
    return (a.sqrt().float() * x0 + (1 - a).sqrt().float() * noise)
