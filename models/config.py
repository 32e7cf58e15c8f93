"""Model configuration: dataclasses with named presets.

`tiny` is exactly ../shared/golden/xportrait/config.json (the official module structure at small
widths); `sd15` is the real X-Portrait size (spec §2). Resolve with `XPortraitConfig.from_name()`.
Nothing here infers architecture from file names: a checkpoint is checked against a config.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


MODALITIES = ("rgb", "depth")  # latent groups the main UNet can carry (UNetConfig.modalities)


@dataclass(frozen=True)
class UNetConfig:
    """Geometry shared by the main UNet, the reference net and both ControlNets (spec §2.1)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get attention
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = (16, 16, 32, 32, 96, 96, 256)  # ControlNet hint convs, then -> model_channels
    hint_strides: tuple[int, ...] = (1, 1, 2, 1, 2, 1, 2, 1)
    # latent channel layout of the *main* UNet: one in_channels-wide latent group per modality, in this
    # order (models/rgbd.py). ("rgb",) is X-Portrait; ("rgb", "depth") the joint RGB-D variant. The
    # reference net and both ControlNets always take the rgb group alone (in_channels wide).
    modalities: tuple[str, ...] = ("rgb",)

    def __post_init__(self):
        m = self.modalities
        if len(set(m)) != len(m) or "rgb" not in m or not set(m) <= set(MODALITIES):
            raise ValueError(f"modalities {m}: need 'rgb' once, plus any of {MODALITIES[1:]} at most once each")

    @property
    def main_in_channels(self) -> int:
        """Channels of the main UNet's input latent x (all modality groups)."""
        return self.in_channels * len(self.modalities)

    @property
    def main_out_channels(self) -> int:
        """Channels of the main UNet's eps (one prediction per modality group)."""
        return self.out_channels * len(self.modalities)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def level_widths(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]


@dataclass(frozen=True)
class MotionConfig:
    """AnimateDiff-v1 'Vanilla' temporal modules (spec §5)."""
    num_heads: int = 8
    max_len: int = 24
    window: int = 16  # frames in one temporal window (official: 16)


@dataclass(frozen=True)
class VAEConfig:
    """LDM kl-f8 autoencoder (spec §2.5)."""
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = 0.18215


@dataclass(frozen=True)
class TAESDConfig:
    """madebyollin/taesd tiny autoencoder (depth-lcm-taesd.md §3)."""
    width: int = 64
    latent_channels: int = 4
    blocks_per_stage: int = 3


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP ViT-L/14 text tower, enough to compute CLIP("") from checkpoint weights (spec §2.6)."""
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    bos_token: int = 49406
    eos_token: int = 49407  # also the pad token of the openai tokenizer


@dataclass(frozen=True)
class ScheduleConfig:
    """LDM 'linear' DDPM schedule (= diffusers 'scaled_linear'), eps-parameterisation (spec §6.1)."""
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012


@dataclass(frozen=True)
class XPortraitConfig:
    name: str = "sd15"
    unet: UNetConfig = field(default_factory=UNetConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    taesd: TAESDConfig = field(default_factory=TAESDConfig)
    clip: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    image_size: int = 512  # default working resolution (pixels, square)

    @property
    def latent_size(self) -> int:
        return self.image_size // 8

    @classmethod
    def from_name(cls, name: str) -> "XPortraitConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_golden_json(cls, path: str | Path) -> "XPortraitConfig":
        """Build a config from a golden set's config.json (the format of ../shared/golden)."""
        d = json.loads(Path(path).read_text())
        try:
            u, m, v = d["unet_common"], d["motion_module"], d["vae"]
            hint = d["controlnet_hint_block"]
            unet = UNetConfig(
                model_channels=u["model_channels"], channel_mult=tuple(u["channel_mult"]),
                num_res_blocks=u["num_res_blocks"], attention_resolutions=tuple(u["attention_resolutions"]),
                num_heads=u["num_heads"], transformer_depth=u["transformer_depth"],
                context_dim=u["context_dim"], hint_channels=hint["hint_channels"],
                in_channels=d.get("latent_channels", 4), out_channels=d.get("latent_channels", 4))
            motion = MotionConfig(num_heads=m["num_attention_heads"],
                                  max_len=m["temporal_position_encoding_max_len"], window=m["video_length"])
            vae = VAEConfig(ch=v["ch"], ch_mult=tuple(v["ch_mult"]), num_res_blocks=v["num_res_blocks"],
                            z_channels=v["z_channels"], embed_dim=v["embed_dim"], scale_factor=v["scale_factor"])
            diff = d["diffusion"]
            sched = ScheduleConfig(timesteps=diff["timesteps"], linear_start=diff["linear_start"],
                                   linear_end=diff["linear_end"])
        except KeyError as e:
            raise ValueError(f"{path}: golden config.json lacks field {e}; is this a golden set directory?") from e
        if diff.get("parameterization", "eps") != "eps":
            raise ValueError(f"{path}: only eps-parameterisation is supported")
        clip = replace(TINY_CLIP, width=unet.context_dim)
        return cls(name=f"golden:{Path(path).parent.name}", unet=unet, motion=motion, vae=vae,
                   taesd=TINY_TAESD, clip=clip, schedule=sched, image_size=d["image_hw"][0])

    def to_dict(self) -> dict:
        return asdict(self)


TINY_CLIP = CLIPTextConfig(width=48, layers=2, heads=4)
TINY_TAESD = TAESDConfig(width=16)

PRESETS: dict[str, XPortraitConfig] = {
    "sd15": XPortraitConfig(),
    "tiny": XPortraitConfig(
        name="tiny",
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 1, 1), context_dim=48),
        motion=MotionConfig(),  # the golden set groups its T=2 frames as one window (config.json video_length)
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 1, 1)),
        taesd=TINY_TAESD,
        clip=TINY_CLIP,
        image_size=128,
    ),
}
# the joint RGB-D variants (models/rgbd.py, docs/rgbd.md): the same model with the main UNet's latent
# widened to [rgb | depth] (8 channels); every other module and key is the RGB preset's
def rgbd_variant(cfg: XPortraitConfig) -> XPortraitConfig:
    """`cfg` with the main UNet's latent widened to [rgb | depth]; named NAME-rgbd."""
    return replace(cfg, name=f"{cfg.name}-rgbd", unet=replace(cfg.unet, modalities=("rgb", "depth")))


PRESETS.update({f"{n}-rgbd": rgbd_variant(PRESETS[n]) for n in ("sd15", "tiny")})
