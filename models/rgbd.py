"""Joint depth + appearance ("rgbd") variant of X-Portrait: latent layout, modes, checkpoint conversion.

Paper: Ji et al. 2025, "Joint Learning of Depth and Appearance for Portrait Image Animation" (arXiv
2501.08649): a reference network plus a channel-expanded backbone that denoises RGB and depth latents
together. No code or weights are public; what is fixed here follows ../shared/docs/depth-lcm-taesd.md
§1.3-1.4 and Marigold's public recipe (§1b). docs/rgbd.md has the design and its reasons.

Layout. `UNetConfig.modalities`, e.g. ("rgb", "depth"): the main UNet's latent x is one 4-channel
latent per modality, concatenated in that order (B, 4·G, h, w), and its eps has the same layout. Depth
is encoded by the RGB autoencoder (models/depth.py), so every group lives in one latent space. Only
the main UNet's first conv and last conv are wider; the reference net (clean RGB source latent) and
both ControlNets (the rgb group of x, at the rgb timestep) are the RGB model's, key for key.

Timesteps. t is (B,) (every modality at t) or (B, G), one per modality in layout order. The main UNet's
time embedding is then the mean of the G embeddings (models/unet.py `embed`): exactly the RGB model's
when all are equal. Separate timesteps per modality (JointDiT's idea) give the "clean" conditional
modes; a model must be trained with independent per-modality t for them.

Modes (per call, `RGBDMode`), through the unchanged samplers: `compose` builds the UNet input from the
sampler's latent, `finish` puts the given latent back at the end.
    joint           both groups noised and denoised (t, t)
    image-to-depth  RGB given, depth denoised
    depth-to-image  depth given, RGB denoised
The given group enters as `known`="renoise" (RePaint / "channel-wise inpainting": the given latent
noised to the step's t with a fixed noise tensor, timesteps (t, t); works with a jointly trained model)
or `known`="clean" (the given latent as is, its timestep 0).

Checkpoint conversion (`widen_state_dict`, `python -m models.rgbd convert`): only conv_in
(`input_blocks.0.0.weight`) and the output conv (`out.2.weight/bias`) change shape.
    init "zero" (default): conv_in's RGB input columns are the RGB weights, the depth columns zero; every
        output group is a copy of the RGB output conv. Promise: for ANY depth latent and one timestep for
        all modalities, every eps group equals the RGB model's eps on the RGB latent.
    init "marigold": conv_in's weights are tiled over the G groups and divided by G (bias kept), output
        rows copied. Promise: when every group holds the same latent (and one timestep), every eps group
        equals the RGB model's eps.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models.samplers import cfg_combine

MODES = ("joint", "image-to-depth", "depth-to-image")
KNOWN = ("renoise", "clean")
INITS = ("zero", "marigold")
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
CONV_OUT = ("model.diffusion_model.out.2.weight", "model.diffusion_model.out.2.bias")


# ------------------------------------------------------------------------------------- layout
def is_rgbd(cfg) -> bool:
    return "depth" in cfg.unet.modalities


def group(x: torch.Tensor, modalities: tuple[str, ...], name: str) -> torch.Tensor:
    """The `name` group of a layout latent (B, 4·G, h, w) -> (B, 4, h, w) (a view)."""
    if name not in modalities:
        raise ValueError(f"latent layout {modalities} has no {name!r} group")
    if x.shape[1] % len(modalities):
        raise ValueError(f"latent has {x.shape[1]} channels, not a multiple of the {len(modalities)} "
                         f"groups {modalities}")
    c = x.shape[1] // len(modalities)
    k = modalities.index(name)
    return x[:, k * c:(k + 1) * c]


def join(groups: dict[str, torch.Tensor], modalities: tuple[str, ...]) -> torch.Tensor:
    """{modality: (B, 4, h, w)} -> (B, 4·G, h, w) in layout order."""
    missing = [m for m in modalities if m not in groups]
    if missing:
        raise ValueError(f"layout {modalities} needs groups {missing}")
    return torch.cat([groups[m] for m in modalities], 1)


def widen_source(z: torch.Tensor, modalities: tuple[str, ...]) -> torch.Tensor:
    """Clean RGB source latent (B, 4, h, w) -> layout latent with zeros in every other group: what the
    official init noises to x_T, so the depth group starts as (almost) pure noise. RGB layout: z itself."""
    if modalities == ("rgb",):
        return z
    return join({m: z if m == "rgb" else torch.zeros_like(z) for m in modalities}, modalities)


def control_inputs(x: torch.Tensor, t: torch.Tensor, modalities: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the ControlNets (and the exported `control` graph) take: the rgb group of x and the rgb
    timestep. t: (B,) or (B, G). Views, no copy (a TensorRT binding may need .contiguous())."""
    return group(x, modalities, "rgb"), t[:, modalities.index("rgb")] if t.dim() == 2 else t


def modality_t(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Joint mode's per-modality timesteps: t (B,) -> (B, G), every modality at t (device op, no sync)."""
    return t[:, None].expand(-1, groups).contiguous()


def layout_info(ucfg) -> dict:
    """The manifest's record of the latent layout (export/__main__.py)."""
    c, mods = ucfg.in_channels, ucfg.modalities
    return {"modalities": list(mods), "channels_per_modality": c,
            "groups": {m: [i * c, (i + 1) * c] for i, m in enumerate(mods)},
            "unet_t": "(B,)" if len(mods) == 1 else "(B, G) float: one timestep per modality, in layout order",
            "reference_and_control": "take the rgb group of x (ref_latent: the clean RGB source latent) "
                                     "and the rgb timestep, shape (B,)"}


# -------------------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class RGBDMode:
    mode: str = "joint"       # MODES
    known: str = "renoise"    # KNOWN: how the given modality enters the UNet

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown rgbd mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.known not in KNOWN:
            raise ValueError(f"known must be one of {KNOWN}, got {self.known!r}")

    @property
    def given(self) -> str | None:
        """The modality supplied by the caller (None: joint)."""
        return {"joint": None, "image-to-depth": "rgb", "depth-to-image": "depth"}[self.mode]


def compose(x: torch.Tensor, t: int, mode: RGBDMode, modalities: tuple[str, ...], alphas_cumprod: torch.Tensor,
            given: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet input for the sampler's latent x (F, 4·G, h, w) at timestep t (a Python int).

    given: (F, 4, h, w) clean latent of mode.given; noise: (F, 4, h, w) fixed noise ("renoise").
    alphas_cumprod on the CPU (read as a Python float: no device sync). Returns (x_in, t_mod (F, G) long).
    """
    f = x.shape[0]
    t_mod = torch.full((f, len(modalities)), t, dtype=torch.long, device=x.device)
    name = mode.given
    if name is None:
        return x, t_mod
    if given is None or (mode.known == "renoise" and noise is None):
        raise ValueError(f"mode {mode.mode} needs the given {name} latents" +
                         (" and a fixed noise tensor" if mode.known == "renoise" else ""))
    k, c = modalities.index(name), x.shape[1] // len(modalities)
    if mode.known == "clean":
        z = given
        t_mod[:, k] = 0
    else:
        a = float(alphas_cumprod[t])
        z = a ** 0.5 * given + (1 - a) ** 0.5 * noise
    return torch.cat([x[:, :k * c], z.to(x.dtype), x[:, (k + 1) * c:]], 1), t_mod


def finish(x: torch.Tensor, mode: RGBDMode, modalities: tuple[str, ...], given: torch.Tensor | None) -> torch.Tensor:
    """The final latent with the given group replaced by the given clean latent (joint: unchanged)."""
    if mode.given is None:
        return x
    return join({m: given.to(x) if m == mode.given else group(x, modalities, m) for m in modalities}, modalities)


def eps_from_cache(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, ref_kv: list,
                   pose_feat: torch.Tensor, local_feat: torch.Tensor, scale: float = 1.0,
                   frames: int | None = None) -> torch.Tensor:
    """XPortrait.eps_from_cache for a layout latent: the ControlNets see the rgb group at the rgb
    timestep, the widened main UNet the whole latent with t (B,) or (B, G). CFG as the RGB model."""
    mods = model.cfg.unet.modalities
    control = model.control(*control_inputs(x, t, mods), context, pose_feat, local_feat)
    e_c = model.unet(x, t, context, ref_kv=ref_kv, control=control, frames=frames)
    if scale == 1.0:
        return e_c
    return cfg_combine(e_c, model.unet(x, t, context, frames=frames), scale)


# ------------------------------------------------------------------------ checkpoint conversion
def widen_state_dict(sd: dict[str, torch.Tensor], modalities: tuple[str, ...] = ("rgb", "depth"),
                     init: str = "zero") -> dict[str, torch.Tensor]:
    """An RGB X-Portrait state dict -> the widened layout `modalities` (module docstring). Returns a new
    dict; every other tensor is shared with `sd`."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    missing = [k for k in (CONV_IN, *CONV_OUT) if k not in sd]
    if missing:
        from models.weights import CheckpointError
        raise CheckpointError(f"not an X-Portrait state dict: missing {missing}")
    w_in, (w_out, b_out) = sd[CONV_IN], (sd[k] for k in CONV_OUT)
    g, k = len(modalities), modalities.index("rgb")
    if init == "zero":
        blocks = [w_in if i == k else torch.zeros_like(w_in) for i in range(g)]
    else:
        blocks = [w_in / g] * g
    out = dict(sd)
    out[CONV_IN] = torch.cat(blocks, 1)
    out[CONV_OUT[0]], out[CONV_OUT[1]] = torch.cat([w_out] * g, 0), torch.cat([b_out] * g, 0)
    return out


def check_layout(sd: dict[str, torch.Tensor], cfg) -> None:
    """Raise CheckpointError naming the fix when the file's conv_in width does not fit cfg's layout."""
    from models.weights import CheckpointError
    if CONV_IN not in sd:
        return  # not an X-Portrait file: the strict loader reports it
    have, want, c = sd[CONV_IN].shape[1], cfg.unet.main_in_channels, cfg.unet.in_channels
    if have == want:
        return
    if have == c:
        raise CheckpointError(f"the checkpoint is an RGB X-Portrait model ({have}-channel conv_in) but preset "
                              f"{cfg.name} is widened to {want} channels {cfg.unet.modalities}: convert it once with "
                              f"`python -m models.rgbd convert IN OUT.safetensors --preset {cfg.name}`")
    raise CheckpointError(f"the checkpoint's main UNet takes {have} latent channels, preset {cfg.name} takes {want} "
                          f"{cfg.unet.modalities}: pick the preset the file was made for (e.g. NAME-rgbd for 8)")


def _save(sd: dict[str, torch.Tensor], dst: Path) -> None:
    """Write atomically (models/fileio.py: a hidden temp file renamed on success, removed on any failure or
    interrupt); .safetensors or a torch file."""
    from models.fileio import atomic_output
    seen: set[int] = set()
    flat = {}
    for k, v in sd.items():  # safetensors refuses shared storage: clone repeats
        v = v.contiguous()
        flat[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    with atomic_output(dst) as tmp:
        if dst.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(flat, str(tmp))
        else:
            torch.save(flat, tmp)


def convert_checkpoint(src: str | Path, dst: str | Path, preset: str = "sd15-rgbd", init: str = "zero") -> dict:
    """Convert an RGB X-Portrait checkpoint file for `preset` (an rgbd preset); both layouts are checked
    strictly against models built on the meta device. Returns counts for the log."""
    from models.config import XPortraitConfig
    from models.fileio import check_output_path
    from models.weights import meta_checked, read_state_dict
    cfg = XPortraitConfig.from_name(preset)
    if not is_rgbd(cfg):
        raise ValueError(f"--preset {preset} is not an rgbd preset; use e.g. sd15-rgbd or tiny-rgbd")
    if not Path(src).is_file():
        raise FileNotFoundError(f"IN {src}: no such file")
    # OUT must differ from IN (real path or inode); its folder must exist or be creatable, and be writable
    dst = check_output_path(dst, inputs=(src,), flag="OUT")
    sd = read_state_dict(src)
    rgb_cfg = replace(cfg, name=cfg.name.removesuffix("-rgbd"), unet=replace(cfg.unet, modalities=("rgb",)))
    with_clip = any(k.startswith("cond_stage_model.") for k in sd)
    meta_checked(rgb_cfg, sd, require_text_encoder=False)
    wide = widen_state_dict(sd, cfg.unet.modalities, init)
    meta_checked(cfg, wide, require_text_encoder=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _save(wide, dst)
    return {"tensors": len(wide), "clip": with_clip, "conv_in": tuple(wide[CONV_IN].shape)}


def _main(argv: list[str] | None = None) -> int:
    from models.cli import add_debug_flag
    p = argparse.ArgumentParser(prog="python -m models.rgbd", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    cv = sub.add_parser("convert", help="widen an RGB X-Portrait checkpoint to the rgbd layout")
    cv.add_argument("src", type=Path, metavar="IN", help="RGB checkpoint (model_state-*.th or .safetensors)")
    cv.add_argument("dst", type=Path, metavar="OUT", help="output (.safetensors recommended; never IN)")
    cv.add_argument("--preset", default="sd15-rgbd", help="rgbd preset (default: sd15-rgbd)")
    cv.add_argument("--init", choices=INITS, default="zero", help="widening initialization (default: zero)")
    add_debug_flag(cv)
    a = p.parse_args(argv)
    info = convert_checkpoint(a.src, a.dst, a.preset, a.init)
    print(f"ok: wrote {a.dst} ({info['tensors']} tensors, conv_in {info['conv_in']}, init {a.init})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """One `error: ...` line (1: a bad file or flag, CheckpointError included; 2: usage; 130/143: Ctrl-C/SIGTERM,
    OUT left as it was); --debug: the traceback."""
    from models.cli import run_main
    return run_main(_main, argv, expected=(KeyError,))


if __name__ == "__main__":
    sys.exit(main())
