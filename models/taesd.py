"""TAESD tiny autoencoder (madebyollin/taesd architecture, depth-lcm-taesd.md §3).

Module indices reproduce the public `taesd_encoder.pth` / `taesd_decoder.pth` Sequential layout
(keys like `1.conv.0.weight`), so those files load strictly; the diffusers layout is remapped in
models/weights.py. Latents are in the scaled SD latent space (no 0.18215 factor). Our interface is
[-1, 1] images like the KL VAE: encode() maps to [0, 1] first, decode() maps back.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.config import TAESDConfig


def _conv(cin: int, cout: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(cin, cout), nn.ReLU(), _conv(cout, cout), nn.ReLU(), _conv(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_encoder(cfg: TAESDConfig) -> nn.Sequential:
    w, n = cfg.width, cfg.blocks_per_stage
    layers: list[nn.Module] = [_conv(3, w), Block(w, w)]
    for _ in range(3):
        layers += [_conv(w, w, stride=2, bias=False), *[Block(w, w) for _ in range(n)]]
    return nn.Sequential(*layers, _conv(w, cfg.latent_channels))


def taesd_decoder(cfg: TAESDConfig) -> nn.Sequential:
    w, n = cfg.width, cfg.blocks_per_stage
    layers: list[nn.Module] = [Clamp(), _conv(cfg.latent_channels, w), nn.ReLU()]
    for _ in range(3):
        layers += [*[Block(w, w) for _ in range(n)], nn.Upsample(scale_factor=2), _conv(w, w, bias=False)]
    return nn.Sequential(*layers, Block(w, w), _conv(w, 3))


class TAESD(nn.Module):
    def __init__(self, cfg: TAESDConfig):
        super().__init__()
        self.encoder, self.decoder = taesd_encoder(cfg), taesd_decoder(cfg)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> scaled latent (B, 4, H/8, W/8)."""
        return self.encoder((x + 1) / 2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1] (unclamped)."""
        return self.decoder(z) * 2 - 1
