"""The three UNet-shaped networks of X-Portrait (spec §2.2-2.4).

* `UNetBody`       - time_embed + input_blocks + middle_block (+ output_blocks); shared layout.
* `MainUNet`       - model.diffusion_model: + 20 motion modules, reference K/V reading in every
                     attn1, 13 ControlNet residual inputs, `out` head.
* `ReferenceNet`   - appearance_control_model: runs the full UNet on the clean source latent and
                     returns the 16 LN1 outputs ("bank"); stops after the last one (the tail is dead).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.config import MotionConfig, UNetConfig
from models.layers import (AttnIO, Downsample, ResBlock, SpatialTransformer, TimestepBlock, Upsample,
                           norm32, timestep_embedding)
from models.motion import motion_module

NUM_BANK = 16  # transformer blocks per SD1.5 UNet (in 1,2,4,5,7,8, mid, out 3..11)


def hint_block(cfg: UNetConfig) -> nn.Sequential:
    """ControlNet hint encoder: 8 3x3 convs (strides 1,1,2,1,2,1,2,1), SiLU between; /8 spatially."""
    widths = [cfg.hint_channels, *cfg.hint_widths, cfg.model_channels]
    layers: list[nn.Module] = []
    for i, stride in enumerate(cfg.hint_strides):
        if i:
            layers.append(nn.SiLU())
        layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, stride=stride, padding=1))
    return nn.Sequential(*layers)


class UNetBody(nn.Module):
    """Builds the official block lists. `with_decoder=False` gives the ControlNet encoder+middle."""

    def __init__(self, cfg: UNetConfig, with_decoder: bool = True, in_channels: int | None = None):
        super().__init__()
        mc, emb_dim = cfg.model_channels, cfg.time_embed_dim
        self.cfg = cfg
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def st(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth, cfg.context_dim)

        conv_in = nn.Conv2d(in_channels or cfg.in_channels, mc, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepBlock(conv_in)])
        chans, ch, ds = [mc], mc, 1
        self.input_widths: list[int] = [mc]
        self.res_input_ids: list[int] = []  # input blocks that hold a ResBlock (motion modules follow them)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(st(ch))
                self.res_input_ids.append(len(self.input_blocks))
                self.input_blocks.append(TimestepBlock(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepBlock(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.input_widths = list(chans)
        self.middle_block = TimestepBlock(ResBlock(ch, emb_dim, ch), st(ch), ResBlock(ch, emb_dim, ch))
        self.mid_width = ch
        self.output_widths: list[int] = []
        if with_decoder:
            self.output_blocks = nn.ModuleList()
            for level, mult in reversed(list(enumerate(cfg.channel_mult))):
                for i in range(cfg.num_res_blocks + 1):
                    layers = [ResBlock(ch + chans.pop(), emb_dim, mc * mult)]
                    ch = mc * mult
                    if ds in cfg.attention_resolutions:
                        layers.append(st(ch))
                    if level and i == cfg.num_res_blocks:
                        layers.append(Upsample(ch))
                        ds //= 2
                    self.output_blocks.append(TimestepBlock(*layers))
                    self.output_widths.append(ch)
        self.out_width = ch

    def embed(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t: (B,), or (B, G) one timestep per latent modality (models/rgbd.py): the mean of their
        embeddings, which equals the (B,) embedding when all G are equal."""
        if t.dim() == 2:
            b, g = t.shape
            return self.time_embed(timestep_embedding(t.reshape(b * g), self.cfg.model_channels).to(dtype)
                                   ).reshape(b, g, -1).mean(1)
        return self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))


class MainUNet(UNetBody):
    """model.diffusion_model (ControlledUnetModelAttn_Temporal_Pose_Local), spec §2.2."""

    def __init__(self, cfg: UNetConfig, motion: MotionConfig):
        super().__init__(cfg, with_decoder=True, in_channels=cfg.main_in_channels)  # widened for rgbd
        mm = lambda ch: motion_module(ch, motion.num_heads, motion.max_len)  # noqa: E731
        widths = self.input_widths
        self.input_blocks_motion_module = nn.ModuleList([mm(widths[i]) for i in self.res_input_ids])
        self.output_blocks_motion_module = nn.ModuleList([mm(w) for w in self.output_widths])
        self.out = nn.Sequential(norm32(self.out_width), nn.SiLU(),
                                 nn.Conv2d(cfg.model_channels, cfg.main_out_channels, 3, padding=1))

    def attn1_layers(self) -> list:
        """The 16 attn1 modules that read reference tokens, in bank order."""
        return [m.attn1 for m in self.modules() if hasattr(m, "attn1")]

    def reference_kv(self, bank: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Project the reference net's bank with this UNet's attn1 K/V weights (cache per source, t)."""
        layers = self.attn1_layers()
        if len(bank) != len(layers):
            raise ValueError(f"reference bank has {len(bank)} entries, the UNet has {len(layers)} attn1 layers")
        return [layer.project_kv(b) for layer, b in zip(layers, bank)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                ref_kv: list | None = None, control: list[torch.Tensor] | None = None,
                frames: int | None = None) -> torch.Tensor:
        """x: (B*F, 4·G, h, w) noisy latents, G = len(cfg.modalities) (1: RGB); t: (B*F,) or (B*F, G)
        one per modality; context: (B*F, 77, Cctx). Returns eps in the layout of x.

        ref_kv: 16 (K_ref, V_ref) pairs of shape (1 or B*F, M, C) or None (plain self-attention,
        the unconditional branch). control: 13 summed ControlNet residuals or None. frames: frames
        per temporal window (default: the whole batch is one window).
        """
        frames = frames or x.shape[0]
        return self.run(x, t, context, ref_kv, control, lambda module, h: module(h, frames))

    def run(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, ref_kv: list | None,
            control: list[torch.Tensor] | None, motion) -> torch.Tensor:
        """The block loop shared by the full-window and streaming UNets; `motion(module, h)` applies
        one of the 20 motion modules (models/streaming.py passes its ring-cache version)."""
        emb = self.embed(t, x.dtype)
        attn = AttnIO(ref_kv=ref_kv)
        hs, h, m = [], x, 0
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context, attn)
            if i in self.res_input_ids:
                h = motion(self.input_blocks_motion_module[m], h)
                m += 1
            hs.append(h)
        h = self.middle_block(h, emb, context, attn)
        if control is not None:
            h = h + control[-1]
        for j, block in enumerate(self.output_blocks):
            skip = hs.pop()
            if control is not None:
                skip = skip + control[len(self.output_blocks) - 1 - j]
            h = block(torch.cat([h, skip], dim=1), emb, context, attn)
            h = motion(self.output_blocks_motion_module[j], h)
        return self.out(h)


class ReferenceNet(UNetBody):
    """appearance_control_model (ControlNetReferenceOnly), spec §2.3 / §3.1.

    `input_hint_block` exists only so official checkpoints load strictly; forward never uses it.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg, with_decoder=True)
        self.input_hint_block = hint_block(cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 4, h, w) clean source latent; returns the 16 bank tensors (B, h_l*w_l, C_l)."""
        emb = self.embed(t, x.dtype)
        bank: list[torch.Tensor] = []
        attn = AttnIO(record=bank, record_limit=NUM_BANK)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, attn)
            hs.append(h)
        h = self.middle_block(h, emb, context, attn)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context, attn)
            if attn.stop_after_record():
                break
        return bank
