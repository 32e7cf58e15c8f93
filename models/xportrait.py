"""The whole X-Portrait model (ControlLDMReferenceOnly_Temporal_Pose_Local), spec §1-§3.

Children and buffers carry the official state-dict prefixes, so an official checkpoint loads with
`load_state_dict(strict=True)`. The methods are the pieces a runtime caches at different rates
(spec §9.4): per source (`source_latent`, `reference_kv` per timestep), per frame
(`hint_features`), per frame and step (`control`, `eps_cond` / `eps_uncond`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from models.clip import CLIPTextModel
from models.config import XPortraitConfig
from models.controlnet import ControlNet
from models.schedule import ddpm_buffers
from models.samplers import cfg_combine
from models.unet import MainUNet, ReferenceNet
from models.vae import AutoencoderKL


class _DiffusionWrapper(nn.Module):
    def __init__(self, unet: MainUNet):
        super().__init__()
        self.diffusion_model = unet


@dataclass
class Conditioning:
    """Everything the conditional branch needs beyond (x_t, t, context)."""
    ref_latent: torch.Tensor  # (1, 4, h, w) clean scaled source latent, shared by all frames
    pose_hint: torch.Tensor   # (B, 3, H, W) aligned driving frames in [-1, 1]
    local_hint: torch.Tensor  # (B, 3, H, W) eyes/mouth patches on -1 background


class XPortrait(nn.Module):
    def __init__(self, cfg: XPortraitConfig, with_text_encoder: bool = False):
        super().__init__()
        self.cfg = cfg
        self.model = _DiffusionWrapper(MainUNet(cfg.unet, cfg.motion))
        self.appearance_control_model = ReferenceNet(cfg.unet)
        self.pose_control_model = ControlNet(cfg.unet)
        self.local_pose_control_model = ControlNet(cfg.unet)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        if with_text_encoder:
            self.cond_stage_model = nn.Module()
            self.cond_stage_model.transformer = CLIPTextModel(cfg.clip)
        for name, buf in ddpm_buffers(cfg.schedule).items():
            self.register_buffer(name, buf)

    @property
    def unet(self) -> MainUNet:
        return self.model.diffusion_model

    def set_attention_kernels(self, enabled: bool) -> None:
        """Route reference attention through the Triton kernels (kernels/) instead of PyTorch."""
        for m in self.modules():
            if hasattr(m, "use_kernels"):
                m.use_kernels = enabled

    # -- once per source ------------------------------------------------------------------------
    def source_latent(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> clean scaled latent (posterior mean; spec §10.10)."""
        return self.first_stage_model.latent(image)

    def reference_bank(self, ref_latent: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list:
        """The 16 LN1 outputs of the reference net at timestep t (a pure function of source and t)."""
        b = ref_latent.shape[0]
        return self.appearance_control_model(ref_latent, t[:1].expand(b), context[:b])

    def reference_kv(self, ref_latent: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list:
        """Per-layer (K_ref, V_ref) for the main UNet's attn1 layers: cache per (source, t)."""
        return self.unet.reference_kv(self.reference_bank(ref_latent, t, context))

    # -- once per frame -------------------------------------------------------------------------
    def hint_features(self, pose_hint: torch.Tensor, local_hint: torch.Tensor) -> tuple:
        return self.pose_control_model.encode_hint(pose_hint), self.local_pose_control_model.encode_hint(local_hint)

    # -- once per frame and step ----------------------------------------------------------------
    def control(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                pose_feat: torch.Tensor, local_feat: torch.Tensor) -> list[torch.Tensor]:
        """The 13 summed pose + local ControlNet residuals (both at scale 1.0, spec §4.3)."""
        pose = self.pose_control_model(x, t, context, pose_feat)
        local = self.local_pose_control_model(x, t, context, local_feat)
        return [p + q for p, q in zip(pose, local)]

    def eps_from_cache(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, ref_kv: list,
                       pose_feat: torch.Tensor, local_feat: torch.Tensor, scale: float = 1.0,
                       frames: int | None = None) -> torch.Tensor:
        """eps (CFG-combined when scale != 1) from the cached pieces: reference K/V for this t (per
        source and step) and both hint features (per frame). The runtime's per-frame-and-step work."""
        control = self.control(x, t, context, pose_feat, local_feat)
        e_c = self.unet(x, t, context, ref_kv=ref_kv, control=control, frames=frames)
        if scale == 1.0:
            return e_c
        return cfg_combine(e_c, self.eps_uncond(x, t, context, frames), scale)

    def eps_cond(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cond: Conditioning,
                 frames: int | None = None) -> torch.Tensor:
        return self.eps_cfg(x, t, context, cond, 1.0, frames)

    def eps_uncond(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   frames: int | None = None) -> torch.Tensor:
        """Official unconditional branch: no reference, no ControlNets, same context (spec §6.3)."""
        return self.unet(x, t, context, frames=frames)

    def eps_cfg(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cond: Conditioning,
                scale: float, frames: int | None = None) -> torch.Tensor:
        ref_kv = self.reference_kv(cond.ref_latent[:1], t, context)
        return self.eps_from_cache(x, t, context, ref_kv, *self.hint_features(cond.pose_hint, cond.local_hint),
                                   scale=scale, frames=frames)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(latent)
