"""The live runtime's rgbd part: a joint RGB + depth model streamed frame by frame, relit on the device.

Three pieces, each used by one stage of runtime/live/ (design: docs/rgbd.md "Live"):

* `LatentLayout` (the session): the layout latent [rgb | depth] of an rgbd preset (models/rgbd.py).
  The sampler state x, x_T and the noise get 4·G channels; the ControlNets get the rgb group of x (a
  persistent buffer, so a TensorRT binding or a CUDA graph sees fixed addresses) at the rgb
  timestep; the main UNet gets x and t (B, G), every modality at the step's t (joint mode). Decoding
  runs the one decoder on the G groups (one batched call where the graphs take batch G, else one
  call per group) and returns the RGB frame and the normalized depth (near -1). For the RGB layout
  every method hands back the session's own tensors, so the RGB path is unchanged.
* `DepthView` (the pipeline's device thread, after the session): [RGB or relit RGB | depth as gray,
  near white] as one (R, 2R, 3) uint8 image, built with torch ops on the frame's device, so the one
  device-to-host copy carries both panels and nothing syncs. Relighting is runtime/relight.py with a
  persistent (3,) light buffer, written on the compute stream when the light moves.
* `LightKeys` (the presenting thread): the light the user moves with keys (arrows or i/j/k/l), as
  azimuth/elevation in degrees.

Live modes: joint only (RGB and depth both generated; what reenactment means with a depth channel).
image-to-depth would need a given RGB per frame and depth-to-image a depth camera; both stay
offline (`runtime.animate --depth --depth-mode ...`), and `LatentLayout` refuses them with that fix.

Noise. The rgb group of every fixed noise tensor is drawn exactly as the RGB session draws its
noise (same generator, same order), and the other groups after it. So a zero-initialised converted
checkpoint (models/rgbd.py `widen_state_dict(..., "zero")`: every eps group equals the RGB eps for
any depth latent at one timestep) gives the RGB model's frames in its RGB group, step for step
(tests/test_live_depth.py).
"""
from __future__ import annotations

import torch

from models import rgbd
from models.depth import depth_from_image, to_display
from runtime.relight import RelightConfig, light_direction, relight

LIVE_MODES = ("joint",)


def layout_noise(generator: torch.Generator, modalities: tuple[str, ...], channels: int, steps: int, h: int,
                 w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise of a session: x_T's (1, C·G, h, w) and the per-step (S, C·G, h, w), on the CPU.

    The rgb group is drawn first, exactly as an RGB session draws its noise; then each other group."""
    draws = {"rgb": (torch.randn(1, channels, h, w, generator=generator),
                     torch.randn(steps, channels, h, w, generator=generator))}
    if modalities == ("rgb",):
        return draws["rgb"]
    for m in modalities:
        if m != "rgb":
            draws[m] = (torch.randn(1, channels, h, w, generator=generator),
                        torch.randn(steps, channels, h, w, generator=generator))
    return tuple(rgbd.join({m: d[k] for m, d in draws.items()}, modalities) for k in (0, 1))


class LatentLayout:
    """How a live session feeds and decodes its layout latent (module docstring)."""

    def __init__(self, modalities: tuple[str, ...], channels: int, t: torch.Tensor, hw: tuple[int, int],
                 dtypes: dict[str, dict[str, torch.dtype]], max_batch: int | None = None, mode: str = "joint"):
        """modalities: cfg.unet.modalities; channels: per group (4); t: the session's (S,) float
        timesteps on its device; dtypes: Graphs.input_dtypes; max_batch: Graphs.max_batch."""
        if mode not in LIVE_MODES:
            raise ValueError(f"live rgbd mode {mode!r}: the live runtime runs {', '.join(LIVE_MODES)} only (both "
                             "modalities generated); image-to-depth and depth-to-image need a given frame stream: "
                             "use python -m runtime.animate --depth --depth-mode ...")
        if "rgb" not in modalities:
            raise ValueError(f"latent layout {modalities} has no rgb group")
        self.modalities, self.group_channels = tuple(modalities), channels
        self.groups = len(self.modalities)
        self.channels = channels * self.groups
        self.has_depth = "depth" in self.modalities
        if self.groups == 1:
            return
        S, dev = t.shape[0], t.device
        self.t_unet = rgbd.modality_t(t, self.groups).to(dtypes["unet_stream"]["t"])  # (S, G), joint mode
        self.x_ctrl = torch.zeros(S, channels, *hw, device=dev, dtype=dtypes["control"]["x"])
        self.x_dec = torch.zeros(self.groups, channels, *hw, device=dev, dtype=dtypes["decoder"]["latent"])
        self.batched_decode = max_batch is None or max_batch >= self.groups

    def source(self, z: torch.Tensor) -> torch.Tensor:
        """Clean RGB source latent -> the latent x_T is made from (other groups zero; RGB: z itself)."""
        return rgbd.widen_source(z, self.modalities)

    def control_x(self, x_in: torch.Tensor, rows: slice) -> torch.Tensor:
        """The ControlNets' x for ring elements `rows`: the rgb group of x_in (RGB layout: x_in)."""
        if self.groups == 1:
            return x_in
        buf = self.x_ctrl[rows]
        buf.copy_(rgbd.group(x_in, self.modalities, "rgb"))
        return buf

    def unet_t(self, t: torch.Tensor, rows: slice) -> torch.Tensor:
        """The main UNet's t for `rows`: t itself (RGB), or (rows, G), every modality at t (joint)."""
        return t if self.groups == 1 else self.t_unet[rows]

    def decode(self, decoder, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """latent (1, C·G, h, w) -> (rgb (3, R, R) in [-1, 1] unclamped, depth (R, R) float32 normalized,
        near -1, or None without a depth group). As models.depth.decode_rgbd, through the graph runner."""
        x = self.x_dec
        x.copy_(latent.reshape(x.shape))  # row k = group k, in layout order
        if self.batched_decode:
            img = decoder({"latent": x})["image"]
        else:
            img = torch.cat([decoder({"latent": x[k:k + 1]})["image"] for k in range(self.groups)])
        rgb = img[self.modalities.index("rgb")]
        if not self.has_depth:
            return rgb, None
        k = self.modalities.index("depth")
        return rgb, depth_from_image(img[k:k + 1].float())[0, 0]


class DepthView:
    """[RGB (relit if on) | depth gray] per frame, on the device; `panels` images wide."""

    panels = 2

    def __init__(self, device: torch.device | str, relight_on: bool = False, cfg: RelightConfig = RelightConfig(),
                 light: torch.Tensor | None = None):
        self.device, self.relight_on, self.cfg = torch.device(device), relight_on, cfg
        self.light = torch.zeros(3, device=self.device)  # persistent: per-frame reads never move
        self.set_light(LightKeys().direction() if light is None else light)

    def set_light(self, direction: torch.Tensor) -> None:
        """A new light direction (3,) made on the CPU. Call it on the stream the frames run on (the
        pipeline's device thread does): the copy is async from pinned memory and ordered before the
        next frame's relight."""
        src = direction.float().reshape(3)
        if self.device.type == "cuda":
            src = src.pin_memory()
        self.light.copy_(src, non_blocking=True)

    def __call__(self, image: torch.Tensor, depth: torch.Tensor, clock=None) -> torch.Tensor:
        """image (R, R, 3) uint8 and depth (R, R) normalized on the device -> (R, 2R, 3) uint8."""
        if depth is None:
            raise ValueError("the depth view needs a session with a depth output: an rgbd preset (--depth)")
        main = image
        if self.relight_on:
            rgb = image.permute(2, 0, 1)[None].float() / 127.5 - 1
            lit = relight(rgb, depth[None, None].float(), self.light, self.cfg)
            main = ((lit[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
        gray = (to_display(depth.float()) * 255).round().to(torch.uint8)
        out = torch.cat([main, gray[..., None].expand(-1, -1, 3)], 1)
        if clock is not None:
            clock.mark("relight" if self.relight_on else "depth")
        return out


LIGHT_ACTIONS = {"light_left": (-1, 0), "light_right": (1, 0), "light_up": (0, 1), "light_down": (0, -1)}


class LightKeys:
    """The light the user moves: azimuth (> 0: the viewer's right) and elevation (> 0: up), degrees.
    Each key action moves it by `step`, clamped to +-`limit` (the light stays in front of the face)."""

    def __init__(self, azimuth: float = -30.0, elevation: float = 30.0, step: float = 15.0, limit: float = 80.0):
        if not 0 < limit < 90 or step <= 0:
            raise ValueError(f"light keys need 0 < limit < 90 and step > 0, got limit={limit}, step={step}")
        self.step, self.limit = step, limit
        self.azimuth, self.elevation = self._clamp(azimuth), self._clamp(elevation)

    def _clamp(self, v: float) -> float:
        return max(-self.limit, min(self.limit, v))

    def apply(self, actions: list[str]) -> bool:
        """Apply the light_* actions of a sink's action list; True when the light moved."""
        before = (self.azimuth, self.elevation)
        for a in actions:
            if a in LIGHT_ACTIONS:
                da, de = LIGHT_ACTIONS[a]
                self.azimuth = self._clamp(self.azimuth + da * self.step)
                self.elevation = self._clamp(self.elevation + de * self.step)
        return (self.azimuth, self.elevation) != before

    def direction(self) -> torch.Tensor:
        """Unit direction toward the light (3,) on the CPU (runtime/relight.py axes)."""
        return light_direction(self.azimuth, self.elevation)

    def describe(self) -> str:
        return f"light az {self.azimuth:+.0f} el {self.elevation:+.0f} (arrows / i j k l)"
