"""Depth through the RGB autoencoders (KL VAE or TAESD): an invertible normalization, encode, decode.

The recipe is Marigold's (prs-eth/Marigold; ../shared/docs/depth-lcm-taesd.md §1b): depth is mapped
affinely to [-1, 1], replicated to 3 channels and encoded by the *unchanged* RGB autoencoder; decoding
averages the 3 output channels and clips to [-1, 1]. The same code serves the KL VAE (posterior mean
x 0.18215) and TAESD (already in the scaled latent space), so an rgbd latent is [z_rgb | z_depth] in
one latent space (models/rgbd.py).

Normalization (`DepthRange`), depth d in any unit, larger = farther:
    n = 2 (d - near) / (far - near) - 1        near -> -1, far -> +1, clipped to [-1, 1]
    d = near + (n + 1) / 2 (far - near)        the exact inverse on [near, far]
near/far are either given (a capture's metric working range) or fitted per clip, affine-invariant as
in Marigold: the 2 % and 98 % quantiles of the valid depths (`DepthRange.fit`; quantile 0 gives min/max,
so nothing is clipped and the round trip is exact up to float rounding). Invalid depths (non-finite or
<= 0) map to far. A generated depth is relative (affine-invariant) unless a range is supplied.

Display convention (depth videos): gray = (1 - n) / 2, so near is white and far black.

The codec round trip needs real autoencoder weights: random weights do not reconstruct anything.
`python -m models.depth --taesd DIR` measures it on an analytic portrait-like depth (docs/rgbd.md).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DepthRange:
    """Affine map between depth (near..far, any unit) and normalized depth in [-1, 1]."""
    near: float
    far: float

    def __post_init__(self):
        if not (self.far > self.near):  # also rejects NaN
            raise ValueError(f"depth range needs far > near, got near={self.near}, far={self.far}")

    @classmethod
    def fit(cls, depth: torch.Tensor, quantile: float = 0.02) -> "DepthRange":
        """Per-clip affine-invariant range: the `quantile` and 1 - `quantile` quantiles of valid depths."""
        if not 0.0 <= quantile < 0.5:
            raise ValueError(f"quantile must be in [0, 0.5), got {quantile}")
        d = depth.detach().double().flatten()
        d = d[torch.isfinite(d) & (d > 0)]
        if d.numel() < 2:
            raise ValueError("depth has fewer than 2 valid (finite, > 0) values; cannot fit near/far")
        lo, hi = torch.quantile(d, torch.tensor([quantile, 1 - quantile], dtype=d.dtype)).tolist()
        if not hi > lo:
            raise ValueError(f"depth is constant ({lo}); pass an explicit DepthRange(near, far)")
        return cls(lo, hi)

    def normalize(self, depth: torch.Tensor) -> torch.Tensor:
        """depth (any shape) -> n in [-1, 1]; invalid values (non-finite, <= 0) -> +1 (far)."""
        n = 2 * (depth - self.near) / (self.far - self.near) - 1
        valid = torch.isfinite(depth) & (depth > 0)
        return torch.where(valid, n, torch.ones_like(n)).clamp(-1, 1)

    def denormalize(self, n: torch.Tensor) -> torch.Tensor:
        return self.near + (n + 1) / 2 * (self.far - self.near)


def to_image(n: torch.Tensor) -> torch.Tensor:
    """Normalized depth (B, 1, H, W) -> the 3-channel 'image' the RGB encoder takes (replicated)."""
    if n.dim() != 4 or n.shape[1] != 1:
        raise ValueError(f"normalized depth must be (B, 1, H, W), got {tuple(n.shape)}")
    return n.expand(-1, 3, -1, -1)


def depth_from_image(image: torch.Tensor) -> torch.Tensor:
    """Decoded 3-channel image (B, 3, H, W) -> normalized depth (B, 1, H, W): channel mean, clipped."""
    return image.mean(1, keepdim=True).clamp(-1, 1)


def encode_depth(codec, n: torch.Tensor) -> torch.Tensor:
    """Normalized depth (B, 1, H, W) in [-1, 1] -> scaled latent (B, 4, H/8, W/8) (KL mean or TAESD)."""
    return codec.latent(to_image(n))


def decode_depth(codec, z: torch.Tensor) -> torch.Tensor:
    """Scaled depth latent (B, 4, h, w) -> normalized depth (B, 1, 8h, 8w) in [-1, 1]."""
    return depth_from_image(codec.decode(z))


def decode_rgbd(codec, latent: torch.Tensor, modalities: tuple[str, ...] = ("rgb", "depth")
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 4·G, h, w) latent in the layout `modalities` -> (rgb (B, 3, 8h, 8w) in [-1, 1] unclamped,
    depth (B, 1, 8h, 8w) in [-1, 1]). One batched decoder call for both; device tensors, no host sync."""
    from models.rgbd import group
    rgb, dep = group(latent, modalities, "rgb"), group(latent, modalities, "depth")
    b = rgb.shape[0]
    img = codec.decode(torch.cat([rgb, dep]))
    return img[:b], depth_from_image(img[b:])


def to_display(n: torch.Tensor) -> torch.Tensor:
    """Normalized depth -> gray in [0, 1], near white."""
    return ((1 - n) / 2).clamp(0, 1)


def from_display(gray: torch.Tensor) -> torch.Tensor:
    """Gray in [0, 1] (near white) -> normalized depth."""
    return (1 - 2 * gray).clamp(-1, 1)


@torch.no_grad()
def round_trip_error(codec, n: torch.Tensor) -> dict[str, float]:
    """Normalized depth -> latent -> depth: max and mean |error| in normalized units (range 2)."""
    p = next(codec.parameters())
    back = decode_depth(codec, encode_depth(codec, n.to(p.device, p.dtype))).float().cpu()
    err = (back - n.float().cpu()).abs()
    return {"max_abs": float(err.max()), "mean_abs": float(err.mean())}


def portrait_depth(size: int = 256) -> torch.Tensor:
    """An analytic portrait-like depth (head sphere, nose bump, neck and a background plane),
    arbitrary units, (1, 1, size, size). Used to measure the codec round trip."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    d = torch.full_like(x, 3.0)  # background plane
    head = (0.55 ** 2 - x ** 2 - (y + 0.1) ** 2).clamp(min=0).sqrt()
    nose = 0.08 * torch.exp(-(x ** 2 + (y + 0.05) ** 2) / 0.01)
    neck = ((x.abs() < 0.25) & (y > 0.3)).float() * (0.25 ** 2 - x ** 2).clamp(min=0).sqrt()
    d = torch.where(head > 0, 2.0 - head - nose, d)
    d = torch.where((head == 0) & (neck > 0), 2.2 - neck, d)
    return d[None, None]


def _taesd(cfg, path: Path):
    from models.taesd import TAESD
    from models.weights import load_taesd
    taesd = TAESD(cfg.taesd).eval()
    if not path.is_dir():
        load_taesd(taesd, diffusers=path)
        return taesd
    files = {w: [path / f"taesd_{w}{e}" for e in (".safetensors", ".pth") if (path / f"taesd_{w}{e}").is_file()]
             for w in ("encoder", "decoder")}
    if not all(files.values()):
        raise FileNotFoundError(f"{path} lacks taesd_encoder/taesd_decoder (.pth or .safetensors)")
    load_taesd(taesd, encoder=files["encoder"][0], decoder=files["decoder"][0])
    return taesd


def _main(argv: list[str] | None = None) -> int:
    from models.cli import add_debug_flag
    p = argparse.ArgumentParser(prog="python -m models.depth",
                                description="measure the depth round trip through TAESD and/or the KL VAE")
    p.add_argument("--taesd", help="folder with taesd_encoder/decoder (.pth or .safetensors), or a diffusers file")
    p.add_argument("--checkpoint", help="X-Portrait (or converted rgbd) checkpoint: its KL VAE (first_stage_model.*)")
    p.add_argument("--preset", default="sd15")
    p.add_argument("--size", type=int, default=256)
    add_debug_flag(p)
    a = p.parse_args(argv)
    if not (a.taesd or a.checkpoint):
        p.error("pass --taesd and/or --checkpoint (random weights do not reconstruct, so there is nothing to measure)")
    from models.config import PRESETS, XPortraitConfig
    if a.preset not in PRESETS:  # flags and files before any model is built
        raise ValueError(f"--preset {a.preset}: unknown; choose one of {', '.join(sorted(PRESETS))}")
    if a.size < 8 or a.size % 8:
        raise ValueError(f"--size {a.size}: must be a positive multiple of 8 (the autoencoders downsample by 8)")
    for flag, path in (("--taesd", a.taesd), ("--checkpoint", a.checkpoint)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    cfg = XPortraitConfig.from_name(a.preset)
    n = DepthRange.fit(portrait_depth(a.size), 0.0).normalize(portrait_depth(a.size))
    if a.taesd:
        print("taesd:", round_trip_error(_taesd(cfg, Path(a.taesd)), n))
    if a.checkpoint:
        from models.vae import AutoencoderKL
        from models.weights import read_state_dict
        vae = AutoencoderKL(cfg.vae).eval()
        sd = read_state_dict(a.checkpoint)
        vae.load_state_dict({k[len("first_stage_model."):]: v for k, v in sd.items()
                             if k.startswith("first_stage_model.")}, strict=True)
        print("kl vae:", round_trip_error(vae, n))
    return 0


def main(argv: list[str] | None = None) -> int:
    """One `error: ...` line (1: a bad flag or file, checked before any model is built, or weights that do
    not fit; 2: usage; 130/143: Ctrl-C/SIGTERM); --debug: the traceback. Writes no file."""
    from models.cli import run_main
    return run_main(_main, argv, expected=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
