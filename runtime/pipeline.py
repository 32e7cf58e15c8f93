"""Offline X-Portrait pipeline: preprocessed tensors -> source latent -> windowed sampling -> frames.

The reference pipeline that the optimized runtime is measured against (spec §1, §5.2, §6). Per
run it computes, at the rates the caching matrix allows (spec §9.4):

* once per source: the clean source latent (KL VAE posterior mean, or TAESD) and CLIP("");
* once per (source, t): the reference net's K/V for the main UNet's 16 attn1 layers, shared by
  every window of that step (the official code recomputes the reference net at batch 16 for every
  window);
* once per frame: both ControlNet hint encodings;
* per frame and step, inside 16-frame windows (runtime/windows.py): both ControlNet bodies and the
  main UNet (conditional branch), plus the unconditional UNet when CFG is on;
* once per frame: the decode (full KL VAE by default, TAESD as an option).

CFG is on (scale 5, official) for DDIM and off for LCM/TCD by default. The sampler state stays in
float32 whatever the model dtype. Pieces are separate so a test can drive them with golden inputs
(tests/test_pipeline.py reproduces the official 2-step DDIM run through `Denoiser` + `sample`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from models import rgbd
from models.samplers import (INIT_MODES, SAMPLERS, draw_noise, initial_latent, make_sampler,
                             run_sampler, step_noise_fn)
from models.schedule import ddpm_buffers
from models.xportrait import XPortrait
from runtime.windows import WindowSchedule, WindowSpec, windowed

DEFAULT_STEPS = {"ddim": 30, "lcm": 4, "tcd": 4}
DEFAULT_CFG = {"ddim": 5.0, "lcm": 1.0, "tcd": 1.0}


@dataclass(frozen=True)
class SamplingConfig:
    sampler: str = "ddim"
    steps: int | None = None          # None: 30 for DDIM (official, 31 evaluations), 4 for LCM/TCD
    cfg_scale: float | None = None    # None: 5 for DDIM (official), 1 (no uncond pass) for LCM/TCD
    gamma: float = 0.3                # TCD stochasticity (diffusers' eta); 0 = DDIM jumps
    init: str = "official"            # x_T: 'official' (source latent noised to t=999) or 'noise'
    shared_noise: bool = False        # one noise tensor for every frame (x_T and re-noising)
    step_noise: str = "fresh"         # LCM/TCD re-noising: 'fresh' per step or one 'fixed' tensor
    seed: int = 0                     # x_T and step noise, and random window offsets (overrides window.seed)
    window: WindowSpec = field(default_factory=WindowSpec)

    def resolved(self) -> "SamplingConfig":
        """Fill in the per-sampler defaults and validate."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {self.init!r}")
        steps = DEFAULT_STEPS[self.sampler] if self.steps is None else self.steps
        scale = DEFAULT_CFG[self.sampler] if self.cfg_scale is None else float(self.cfg_scale)
        if scale < 1.0:
            raise ValueError(f"CFG scale must be >= 1 (1 = off), got {scale}")
        return replace(self, steps=steps, cfg_scale=scale)


class Denoiser:
    """eps for a window of frames at timestep t, with per-source and per-frame caches.

    model: XPortrait (weights in any dtype); source_latent: (1, 4, h, w) clean scaled latent;
    context: (1, 77, C) CLIP(""); pose_hint, local_hint: (N, 3, H, W) in [-1, 1].
    """

    def __init__(self, model: XPortrait, source_latent: torch.Tensor, context: torch.Tensor,
                 pose_hint: torch.Tensor, local_hint: torch.Tensor, cfg_scale: float = 5.0, hint_batch: int = 16):
        self.model, self.cfg_scale = model, cfg_scale
        p = next(model.unet.parameters())  # the UNets' dtype (the VAE and GroupNorms may stay fp32)
        self.device, self.dtype = p.device, p.dtype
        self.ref_latent = source_latent[:1].to(self.device, self.dtype)
        self.context = context[:1].to(self.device, self.dtype)
        if pose_hint.shape != local_hint.shape:
            raise ValueError(f"pose hint {tuple(pose_hint.shape)} and local hint {tuple(local_hint.shape)} differ")
        feats = [model.hint_features(pose_hint[i:i + hint_batch].to(self.device, self.dtype),
                                     local_hint[i:i + hint_batch].to(self.device, self.dtype))
                 for i in range(0, pose_hint.shape[0], hint_batch)]
        self.pose_feat = torch.cat([f[0] for f in feats])   # (N, mc, h, w): once per frame
        self.local_feat = torch.cat([f[1] for f in feats])
        self._kv_t: int | None = None
        self._kv: list | None = None

    @property
    def frames(self) -> int:
        return self.pose_feat.shape[0]

    def reference_kv(self, t: int) -> list:
        """Reference K/V at timestep t; recomputed only when t changes (once per step)."""
        if self._kv_t != t:
            tt = torch.full((1,), t, dtype=torch.long, device=self.device)
            self._kv, self._kv_t = self.model.reference_kv(self.ref_latent, tt, self.context), t
        return self._kv

    def __call__(self, x: torch.Tensor, t: int, idx: torch.Tensor) -> torch.Tensor:
        """x: (F, 4, h, w) latents of frames idx (one temporal window) -> eps (F, 4, h, w), float32."""
        f = x.shape[0]
        xm = x.to(self.dtype)
        tt = torch.full((f,), t, dtype=torch.long, device=self.device)
        ctx = self.context.expand(f, -1, -1)
        idx = idx.to(self.device)
        eps = self.model.eps_from_cache(xm, tt, ctx, self.reference_kv(t), self.pose_feat[idx],
                                        self.local_feat[idx], scale=self.cfg_scale, frames=f)
        return eps.float()


class RGBDDenoiser(Denoiser):
    """Denoiser of the rgbd variant (models/rgbd.py, docs/rgbd.md): per call, `mode` composes the widened
    latent (the given modality put in, one timestep per modality), then the same cached eps pieces run.

    given, noise: (N, 4, h, w) clean latents of mode.given and the fixed noise that re-noises them.
    """

    def __init__(self, *args, mode: rgbd.RGBDMode, given: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, **kw):
        super().__init__(*args, **kw)
        self.mode, self.modalities, self.alphas = mode, self.model.cfg.unet.modalities, schedule(self.model)
        self.given = None if given is None else given.to(self.device, torch.float32)
        self.noise = None if noise is None else noise.to(self.device, torch.float32)

    def __call__(self, x: torch.Tensor, t: int, idx: torch.Tensor) -> torch.Tensor:
        f, idx = x.shape[0], idx.to(self.device)
        pick = lambda z: None if z is None else z[idx]  # noqa: E731
        x_in, t_mod = rgbd.compose(x, t, self.mode, self.modalities, self.alphas, pick(self.given), pick(self.noise))
        eps = rgbd.eps_from_cache(self.model, x_in.to(self.dtype), t_mod, self.context.expand(f, -1, -1),
                                  self.reference_kv(t), self.pose_feat[idx], self.local_feat[idx],
                                  scale=self.cfg_scale, frames=f)
        return eps.float()

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        return rgbd.finish(latents, self.mode, self.modalities, self.given)


def sample(denoiser: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor], sampler, x_T: torch.Tensor,
           window: WindowSpec, noise_fn: Callable[[int], torch.Tensor | None] | None = None,
           on_window: Callable[[], None] | None = None, on_step=None) -> torch.Tensor:
    """Run `sampler` over all frames: at each step, eps from overlapping windows, averaged."""
    schedule = WindowSchedule(window, x_T.shape[0])

    def window_eps(xw: torch.Tensor, idx: torch.Tensor, t: int) -> torch.Tensor:
        eps = denoiser(xw, t, idx)
        if on_window is not None:
            on_window()
        return eps

    def eps_fn(x: torch.Tensor, t: int, i: int) -> torch.Tensor:
        return windowed(lambda xw, idx: window_eps(xw, idx, t), x, schedule.windows(i))

    return run_sampler(sampler, x_T.float(), eps_fn, on_step=on_step, noise_fn=noise_fn)


def schedule(model: XPortrait) -> torch.Tensor:
    """abar_t in float32 on the CPU: the model's (checkpoint) buffer, or recomputed if it was cast down."""
    ac = model.alphas_cumprod
    return ac.cpu() if ac.dtype == torch.float32 else ddpm_buffers(model.cfg.schedule)["alphas_cumprod"]


def windows_per_step(n_frames: int, window: WindowSpec) -> int:
    return len(WindowSchedule(window, n_frames).windows(0))


# ------------------------------------------------------------------------------ encode / decode
@torch.no_grad()
def encode_source(model: XPortrait, image: torch.Tensor, taesd=None) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] -> (1, 4, H/8, W/8) float32 clean scaled latent (KL mean or TAESD)."""
    codec = taesd if taesd is not None else model.first_stage_model
    p = next(codec.parameters())
    return codec.latent(image.to(p.device, p.dtype)).float()


@torch.no_grad()
def decode_latents(model: XPortrait, latents: torch.Tensor, taesd=None, batch: int = 8,
                   on_batch: Callable[[int], None] | None = None, depth: bool = False) -> torch.Tensor:
    """(N, 4, h, w) -> (N, 3, 8h, 8w) float32 images clamped to [-1, 1], on the CPU; with `depth`,
    (N, 1, 8h, 8w) normalized depth (models/depth.py: channel mean, clipped)."""
    from models.depth import depth_from_image
    codec = taesd if taesd is not None else model.first_stage_model
    p = next(codec.parameters())
    out = []
    for i in range(0, latents.shape[0], batch):
        z = latents[i:i + batch].to(p.device, p.dtype)
        img = codec.decode(z).float()
        out.append((depth_from_image(img) if depth else img.clamp(-1, 1)).cpu())
        if on_batch is not None:
            on_batch(z.shape[0])
    return torch.cat(out)


# ------------------------------------------------------------------------------------ the run
@dataclass
class Result:
    images: torch.Tensor   # (N, 3, H, W) float32 in [-1, 1], CPU
    latents: torch.Tensor  # (N, 4·G, h, w) final latents in the model's layout, float32
    config: SamplingConfig  # resolved
    depth: torch.Tensor | None = None  # rgbd: (N, 1, H, W) normalized depth in [-1, 1] (near -1), CPU


@torch.no_grad()
def animate(model: XPortrait, context: torch.Tensor, source: torch.Tensor, pose_hint: torch.Tensor,
            local_hint: torch.Tensor, config: SamplingConfig, taesd_encoder=None, taesd_decoder=None,
            decode_batch: int = 8, progress: Callable[[str, int], Callable[[int], None]] | None = None,
            mode: rgbd.RGBDMode | None = None, given: torch.Tensor | None = None) -> Result:
    """The offline pipeline on preprocessed tensors (runtime.preprocess.Preprocessed fields).

    source: (1, 3, H, W); pose_hint, local_hint: (N, 3, H, W), all in [-1, 1]. context: CLIP("").
    progress(stage, total) returns an advance(n) callback (e.g. a tqdm bar); None is silent.
    rgbd models (models/rgbd.py): `mode` (default joint); `given` is what the mode supplies, (N', 3, H, W)
    RGB frames in [-1, 1] for image-to-depth or (N', 1, H, W) normalized depth for depth-to-image, N' >= N.
    """
    cfg = config.resolved()
    n = pose_hint.shape[0]
    if n < 1:
        raise ValueError("the driving clip has no frames")
    device = next(model.unet.parameters()).device
    z_src = encode_source(model, source, taesd_encoder)
    alphas = schedule(model)
    sampler = make_sampler(cfg.sampler, alphas, cfg.steps, cfg.gamma)
    gen = torch.Generator().manual_seed(cfg.seed)
    mods = model.cfg.unet.modalities
    if len(mods) == 1 and (mode is not None or given is not None):
        raise ValueError(f"depth modes need an rgbd preset (e.g. {model.cfg.name}-rgbd), not {model.cfg.name}")
    shape = (model.cfg.unet.main_in_channels, *z_src.shape[2:])
    src = rgbd.widen_source(z_src, mods)  # rgbd: the depth group of x_T is the official init of a zero latent
    noise = draw_noise(n, shape, gen, cfg.shared_noise)
    x_T = initial_latent(alphas, src.cpu(), noise, cfg.init).to(device)
    noise_fn = step_noise_fn(sampler, n, shape, gen, cfg.step_noise, cfg.shared_noise, device)
    window = replace(cfg.window, seed=cfg.seed) if cfg.window.offsets == "random" else cfg.window
    if len(mods) == 1:
        denoiser = Denoiser(model, z_src, context, pose_hint, local_hint, cfg.cfg_scale)
    else:
        mode = mode or rgbd.RGBDMode()
        z_given = encode_given(model, mode, given, n, source.shape[-2:], taesd_encoder) if mode.given else None
        fixed = rgbd.group(noise, mods, mode.given) if mode.given else None
        denoiser = RGBDDenoiser(model, z_src, context, pose_hint, local_hint, cfg.cfg_scale, mode=mode,
                                given=z_given, noise=fixed)
    advance = progress("denoise", len(sampler) * windows_per_step(n, window)) if progress else None
    latents = sample(denoiser, sampler, x_T, window, noise_fn, on_window=(lambda: advance(1)) if advance else None)
    if len(mods) == 1:
        advance = progress("decode", n) if progress else None
        return Result(decode_latents(model, latents, taesd_decoder, decode_batch, advance), latents.cpu(), cfg)
    latents = denoiser.finish(latents)
    advance = progress("decode", 2 * n) if progress else None
    images = decode_latents(model, rgbd.group(latents, mods, "rgb"), taesd_decoder, decode_batch, advance)
    depth = decode_latents(model, rgbd.group(latents, mods, "depth"), taesd_decoder, decode_batch, advance, depth=True)
    return Result(images, latents.cpu(), cfg, depth)


@torch.no_grad()
def encode_given(model: XPortrait, mode: rgbd.RGBDMode, given: torch.Tensor | None, n: int, hw: tuple[int, int],
                 taesd=None, batch: int = 8) -> torch.Tensor:
    """The given modality's clean latents (n, 4, h, w) float32: RGB frames (N', 3, H, W) in [-1, 1] or
    normalized depth (N', 1, H, W), encoded like the source (KL mean or TAESD); the first n are used."""
    from models.depth import to_image
    want = 3 if mode.given == "rgb" else 1
    if given is None or given.dim() != 4 or given.shape[1] != want or given.shape[0] < n or given.shape[2:] != hw:
        got = None if given is None else tuple(given.shape)
        raise ValueError(f"mode {mode.mode} needs the given {mode.given} as ({n} or more, {want}, {hw[0]}, {hw[1]}) "
                         f"(the working size), got {got}")
    frames = given[:n] if want == 3 else to_image(given[:n])
    return torch.cat([encode_source(model, frames[i:i + batch], taesd) for i in range(0, n, batch)])


# ----------------------------------------------------------------------------------- weights
CHECKPOINT_HELP = ("real pictures need the official X-Portrait checkpoint model_state-415001.th "
                   "(Hugging Face repo fffiloni/X-Portrait: `huggingface-cli download fffiloni/X-Portrait "
                   "model_state-415001.th`), then pass --checkpoint model_state-415001.th --preset sd15")


@dataclass
class Models:
    model: XPortrait
    context: torch.Tensor        # (1, 77, C) CLIP(""), on the model's device and dtype
    taesd: object | None         # models.taesd.TAESD or None
    random_weights: bool
    notes: list[str]


def _load_taesd(cfg, path, random_weights: bool, seed: int):
    from pathlib import Path

    from models.init import init_random_
    from models.taesd import TAESD
    from models.weights import load_taesd
    taesd = TAESD(cfg.taesd)
    if path is None:
        if not random_weights:
            raise ValueError("TAESD encode/decode needs TAESD weights: pass --taesd DIR (taesd_encoder.pth and "
                             "taesd_decoder.pth from madebyollin/taesd) or --taesd FILE (diffusers AutoencoderTiny)")
        return init_random_(taesd, seed + 1)
    path = Path(path)
    if path.is_dir():
        pick = {w: next((path / f"taesd_{w}{ext}" for ext in (".safetensors", ".pth")
                         if (path / f"taesd_{w}{ext}").is_file()), None) for w in ("encoder", "decoder")}
        missing = [w for w, f in pick.items() if f is None]
        if missing:
            raise FileNotFoundError(f"{path} lacks taesd_{missing[0]}.pth (or .safetensors)")
        load_taesd(taesd, encoder=pick["encoder"], decoder=pick["decoder"])
    else:
        load_taesd(taesd, diffusers=path)
    return taesd


@torch.no_grad()
def load_models(preset: str = "tiny", checkpoint=None, sd15_base=None, lora=None, lora_scale: float = 1.0,
                taesd=None, need_taesd: bool = False, seed: int = 0, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> Models:
    """Build the model for `preset` and fill its weights.

    No checkpoint: seeded random weights (models.init), for demos and tests only. Otherwise the
    official X-Portrait file (strict, models.weights.load_xportrait), optionally over an SD1.5 base
    (for CLIP if the X-Portrait file lacks it), then an optional LoRA (e.g. LCM-LoRA) fused into the
    main UNet only (whether to patch the reference net and ControlNets too is open, spec §6.5).
    CLIP("") is computed once and the text encoder dropped. The KL VAE stays in float32 whatever
    `dtype` is (fp16 SD VAEs can overflow, depth-lcm-taesd.md §4; decode runs once per frame, so
    it is cheap to keep); GroupNorm32 layers compute in fp32 whatever their parameters' dtype.
    """
    from models.config import XPortraitConfig
    from models.weights import load_sd15_base, load_xportrait, meta_checked, read_state_dict
    cfg = XPortraitConfig.from_name(preset)
    notes: list[str] = []
    random_weights = checkpoint is None
    if random_weights:
        if sd15_base is not None or lora is not None:
            raise ValueError("--sd15-base/--lora need --checkpoint: X-Portrait's motion modules, reference net "
                             "and ControlNets only come from the X-Portrait checkpoint")
        from models.init import init_random_
        model = init_random_(XPortrait(cfg, with_text_encoder=True), seed).eval()
        notes.append(f"random weights (preset {preset}, seed {seed}): the video shows no portrait; " + CHECKPOINT_HELP)
    else:
        # check the keys on a meta-device model first: a wrong file fails in seconds, without
        # allocating (and default-initialising) 3B parameters; the strict loads then fill every tensor
        sd = read_state_dict(checkpoint)
        if rgbd.is_rgbd(cfg):
            if sd15_base is not None:
                raise ValueError("--sd15-base does not fit an rgbd preset (its UNet is 4-channel); use an X-Portrait "
                                 "checkpoint with CLIP, converted by `python -m models.rgbd convert`")
            rgbd.check_layout(sd, cfg)  # an RGB file gets the conversion command, not a shape list
        model = meta_checked(cfg, sd, require_text_encoder=sd15_base is None)
        model.to_empty(device="cpu")
        if sd15_base is not None:
            load_sd15_base(model, sd15_base)
        load_xportrait(model, sd, require_text_encoder=sd15_base is None)
        del sd
        if lora is not None:
            from models.lora import fuse_lora
            counts = fuse_lora({"unet": model.unet}, lora, lora_scale)
            notes.append(f"LoRA {lora}: fused into {counts['unet']} main-UNet layers (scale {lora_scale})")
    context = model.cond_stage_model.transformer.empty_context()
    del model.cond_stage_model
    tiny_ae = _load_taesd(cfg, taesd, random_weights, seed) if (need_taesd or taesd is not None) else None
    model.to(device=device, dtype=dtype)
    model.first_stage_model.float()
    if tiny_ae is not None:
        tiny_ae.to(device=device, dtype=dtype).eval()
    return Models(model, context.to(device, dtype), tiny_ae, random_weights, notes)
