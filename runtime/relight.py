"""Relighting from generated depth: normals from depth, a Lambert + Blinn-Phong light the user moves,
composited onto the RGB frame. Plain torch ops on whatever device the frame is on (GPU or CPU), no host
sync: the live loop calls `relight(rgb, depth, light)` per frame with device tensors and changes the
light between frames (`light_direction` / `light_from_screen` -> `to_device`).

Geometry (orthographic camera). The image spans x in [-1, 1] across its width (square pixels, so y spans
[-H/W, H/W]); axes x right, y up, z toward the viewer. A normalized depth n (models/depth.py: near -1,
far +1) is the distance z = relief · n in the same units, so `relief` says how deep the whole depth
range is relative to the half-width. For a surface at distance d(x, y), the normal is
    N ∝ (∂d/∂x, ∂d/∂y, 1)
(for a sphere d = z0 - sqrt(R² - x² - y²) this is (x, y, sqrt(R² - x² - y²)) / R, its outward normal),
taken with central differences (replicated edges).

Shading. With unit light direction L (toward the light) and view V = (0, 0, 1):
    lit = rgb · (ambient + (1 - ambient) · max(0, N·L)) + specular · max(0, N·H)^shininess,  H = (L+V)/|L+V|
    out = rgb + strength · foreground · (lit - rgb),  foreground = depth < background
on [0, 1] colours, clipped, returned in [-1, 1]. The original frame's own shading stays in `rgb` (no
albedo is estimated): this is a post-process relight, as in the paper's relighting demo
(depth-lcm-taesd.md §1.4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RelightConfig:
    relief: float = 0.5       # distance units of the normalized depth range, in image half-widths per unit
    ambient: float = 0.35     # light that reaches every pixel, whatever its normal
    strength: float = 1.0     # 0: the input frame; 1: fully relit
    specular: float = 0.15    # Blinn-Phong highlight weight (0: Lambert only)
    shininess: float = 24.0
    background: float = 0.98  # normalized depth at or beyond this is background, left as is

    def __post_init__(self):
        if self.relief <= 0 or not 0 <= self.ambient <= 1 or not 0 <= self.strength <= 1 or self.shininess <= 0:
            raise ValueError(f"relight config out of range: {self} (relief > 0, ambient and strength in [0, 1], "
                             "shininess > 0)")


def depth_gradients(depth: torch.Tensor, relief: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, H, W) normalized depth -> (∂d/∂x, ∂d/∂y), each (B, 1, H, W), in image units (y up)."""
    if depth.dim() != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth must be (B, 1, H, W), got {tuple(depth.shape)}")
    z = F.pad(depth, (1, 1, 1, 1), mode="replicate")
    k = relief * depth.shape[-1] / 4  # pixel spacing 2/W, central difference over 2 pixels
    return (z[..., 1:-1, 2:] - z[..., 1:-1, :-2]) * k, (z[..., :-2, 1:-1] - z[..., 2:, 1:-1]) * k  # rows go down


def normals_from_depth(depth: torch.Tensor, relief: float = 0.5) -> torch.Tensor:
    """(B, 1, H, W) normalized depth -> (B, 3, H, W) unit normals (x right, y up, z toward the viewer)."""
    gx, gy = depth_gradients(depth, relief)
    n = torch.cat([gx, gy, torch.ones_like(gx)], 1)
    return n / n.norm(dim=1, keepdim=True)


def _unit(light: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Light (3,) or (B, 3) -> unit light L and Blinn half vector H, each (B or 1, 3, 1, 1)."""
    l = light.to(like.device, like.dtype).reshape(-1, 3, 1, 1)
    l = l / l.norm(dim=1, keepdim=True)
    view = torch.zeros_like(l)
    view[:, 2] = 1
    half = l + view
    return l, half / half.norm(dim=1, keepdim=True).clamp(min=1e-6)


def shade(normals: torch.Tensor, light: torch.Tensor, shininess: float = 24.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lambert max(0, N·L) and Blinn-Phong max(0, N·H)^shininess, each (B, 1, H, W).

    light: (3,) or (B, 3) direction toward the light (any length), on the normals' device."""
    l, half = _unit(light, normals)
    diffuse = (normals * l).sum(1, keepdim=True).clamp(min=0)
    return diffuse, (normals * half).sum(1, keepdim=True).clamp(min=0) ** shininess


def relight(rgb: torch.Tensor, depth: torch.Tensor, light: torch.Tensor,
            cfg: RelightConfig = RelightConfig()) -> torch.Tensor:
    """rgb (B, 3, H, W) in [-1, 1], depth (B, 1, H, W) normalized (near -1), light (3,) or (B, 3) on
    rgb's device -> relit rgb (B, 3, H, W) in [-1, 1], rgb's dtype. No host sync.

    Same maths as `shade(normals_from_depth(...))`, without building the normal map: N·L =
    (gx·Lx + gy·Ly + Lz) / sqrt(gx² + gy² + 1)."""
    if rgb.dim() != 4 or rgb.shape[1] != 3 or depth.shape[0] != rgb.shape[0] or depth.shape[2:] != rgb.shape[2:]:
        raise ValueError(f"rgb {tuple(rgb.shape)} and depth {tuple(depth.shape)} must be (B, 3, H, W) and (B, 1, H, W)")
    d = depth.to(rgb.dtype)
    gx, gy = depth_gradients(d, cfg.relief)
    inv = torch.rsqrt(gx * gx + gy * gy + 1)
    l, h = _unit(light, rgb)
    diffuse = ((gx * l[:, 0:1] + gy * l[:, 1:2] + l[:, 2:3]) * inv).clamp(min=0)
    gain = cfg.ambient + (1 - cfg.ambient) * diffuse  # (B, 1, H, W)
    base = (rgb + 1) / 2
    lit = base * gain
    if cfg.specular > 0:
        lit = lit + cfg.specular * ((gx * h[:, 0:1] + gy * h[:, 1:2] + h[:, 2:3]) * inv).clamp(min=0) ** cfg.shininess
    weight = cfg.strength * (d < cfg.background).to(rgb.dtype)
    return (base + weight * (lit - base)).clamp(0, 1) * 2 - 1


# ---------------------------------------------------------------------------------- the light
def light_direction(azimuth: float, elevation: float) -> torch.Tensor:
    """Degrees -> unit direction (3,) on the CPU. (0, 0) is frontal; azimuth > 0 moves the light to the
    viewer's right, elevation > 0 up."""
    a, e = math.radians(azimuth), math.radians(elevation)
    return torch.tensor([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])


def light_from_screen(x: float, y: float, depth: float = 1.0) -> torch.Tensor:
    """A pointer at (x, y) in [-1, 1] screen coordinates (y down, like a mouse) -> unit direction (3,):
    the light sits in front of the screen, `depth` half-widths toward the viewer."""
    v = torch.tensor([x, -y, depth])
    return v / v.norm()


def to_device(light: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move a light made on the CPU to the frame's device without stalling the host (pinned, async).
    Call it when the light changes, not per frame."""
    device = torch.device(device)
    if device.type == "cuda":
        return light.pin_memory().to(device, non_blocking=True)
    return light.to(device)
