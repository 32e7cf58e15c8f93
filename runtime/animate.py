"""Animate a portrait with a driving video: `python -m runtime.animate --source IMG --driving VIDEO --out OUT.mp4`.

With no arguments it runs a demo on the shipped samples (samples/source.png, samples/driving.mp4)
with seeded random weights of the `tiny` preset on the CPU (about a minute on 2 cores). Random
weights make no picture: the console and a caption burned into the video say so and how to get
the real checkpoint. With `--checkpoint model_state-415001.th --preset sd15` it runs the real
model (official recipe by default: DDIM 30 steps = 31 evaluations, CFG 5, 16-frame windows
overlapping by 4). Writes OUT.mp4 (the animation, driving fps, one output frame per driving
frame) and OUT_preview.mp4 (source | re-framed driving | output). docs/pipeline.md has details.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.cli import add_debug_flag, run_main
from models.fileio import atomic_outputs, check_output_path
from runtime.pipeline import CHECKPOINT_HELP, DEFAULT_CFG, DEFAULT_STEPS, SamplingConfig, animate, load_models
from models.rgbd import KNOWN, MODES
from runtime.windows import WindowSpec

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_SOURCE = ROOT / "samples" / "source.png"
SAMPLE_DRIVING = ROOT / "samples" / "driving.mp4"
DEFAULT_OUT = Path("artifacts") / "animation.mp4"
DEMO_STEPS = 2  # steps when running on random weights and --steps is not given (keeps the demo ~1 min)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STEP_RANGE = {"ddim": (1, 1000), "lcm": (1, 50), "tcd": (1, 50)}  # models/samplers.py
VIDEO_EXTS = (".mp4", ".mov", ".mkv")  # runtime/video_io.py writes H.264
SHORT_CAPTION = ["RANDOM WEIGHTS: no real", "picture; needs --checkpoint"]
LONG_CAPTION = ["RANDOM WEIGHTS: not a real animation. Real pictures need",
                "model_state-415001.th (HF fffiloni/X-Portrait) via --checkpoint"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.animate", description=__doc__.split("\n\n")[0])
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--source", type=Path, default=SAMPLE_SOURCE, help="portrait image (default: samples/source.png)")
    io.add_argument("--driving", type=Path, default=SAMPLE_DRIVING, help="driving video (default: samples/driving.mp4)")
    io.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output mp4 (default: artifacts/animation.mp4); the preview goes to OUT_preview.mp4")
    io.add_argument("--max-frames", type=int, default=None, help="use only the first N driving frames")
    io.add_argument("--resolution", type=int, default=None, help="working size in pixels (default: the preset's)")
    io.add_argument("--best-frame", type=int, default=-1, help="driving frame for re-framing; -1 auto (default), -2 none")
    io.add_argument("--no-crop", action="store_true", help="do not crop the source around the face")
    io.add_argument("--no-preview", action="store_true", help="skip OUT_preview.mp4")
    w = p.add_argument_group("weights")
    w.add_argument("--checkpoint", type=Path, default=None,
                   help="official X-Portrait model_state-415001.th; without it: seeded random weights (demo)")
    w.add_argument("--preset", choices=("tiny", "sd15", "tiny-rgbd", "sd15-rgbd"), default=None,
                   help="default: sd15 with --checkpoint, else tiny; --depth picks NAME-rgbd")
    w.add_argument("--sd15-base", type=Path, default=None, help="SD1.5 single-file weights (CLIP if the checkpoint lacks it)")
    w.add_argument("--lora", type=Path, default=None, help="kohya LoRA fused into the main UNet (e.g. LCM-LoRA)")
    w.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default: 1)")
    w.add_argument("--taesd", type=Path, default=None, help="TAESD weights: dir with taesd_{encoder,decoder}.pth or a diffusers file")
    w.add_argument("--encoder", choices=("vae", "taesd"), default="vae", help="source encoder (default: vae = full KL VAE)")
    w.add_argument("--decoder", choices=("vae", "taesd"), default="vae", help="frame decoder (default: vae = full KL VAE)")
    r = p.add_argument_group("run")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    r.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp32 on cpu, fp16 on cuda")
    s = p.add_argument_group("sampling")
    s.add_argument("--sampler", choices=tuple(DEFAULT_STEPS), default="ddim", help="default: ddim (official)")
    s.add_argument("--steps", type=int, default=None,
                   help=f"ddim 1-1000, lcm/tcd 1-50; default: {DEFAULT_STEPS} ({DEMO_STEPS} with random weights)")
    s.add_argument("--cfg", type=float, default=None, help=f"CFG scale, 1 = off; default: {DEFAULT_CFG}")
    s.add_argument("--gamma", type=float, default=0.3, help="TCD stochasticity, 0 = DDIM jumps (default: 0.3)")
    s.add_argument("--seed", type=int, default=0, help="noise, random offsets and random weights (default: 0)")
    s.add_argument("--init", choices=("official", "noise"), default="official",
                   help="x_T: source latent noised to t=999 (official, default) or pure noise")
    s.add_argument("--shared-noise", action="store_true", help="one noise tensor for all frames (less flicker)")
    s.add_argument("--step-noise", choices=("fresh", "fixed"), default="fresh", help="LCM/TCD re-noising: a fresh draw per step (default) or one fixed tensor")
    s.add_argument("--window", type=int, default=16, help="frames per temporal window (default: 16)")
    s.add_argument("--overlap", type=int, default=4, help="frames shared by neighbouring windows (default: 4)")
    s.add_argument("--random-offsets", action="store_true", help="official random per-step window offset (seeded)")
    d = p.add_argument_group("depth: the joint RGB-D variant (docs/rgbd.md)")
    d.add_argument("--depth", action="store_true", help="preset NAME-rgbd; also writes OUT_depth.mp4 (near = white)")
    d.add_argument("--depth-mode", choices=MODES, default="joint",
                   help="joint (default); image-to-depth: RGB given (--given VIDEO, default: the re-framed driving "
                        "frames); depth-to-image: depth given (--given VIDEO, gray, near = white)")
    d.add_argument("--known", choices=KNOWN, default="renoise",
                   help="the given modality enters noised to each step's t (renoise, default) or clean at t=0")
    d.add_argument("--given", type=Path, default=None, help="video of the given modality, aligned with the output")
    add_debug_flag(p)
    return p.parse_args(argv)


def _caption(frames: np.ndarray, lines: list[str]) -> np.ndarray:
    """Burn `lines` into the bottom of (N, H, W, 3) uint8 frames on a darkened band, scaled to fit W."""
    import cv2
    h, wd = frames.shape[1:3]
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = min(0.5, (wd - 6) / max(cv2.getTextSize(s, font, 1.0, 1)[0][0] for s in lines))
    line_h = int(cv2.getTextSize("Ag", font, scale, 1)[0][1] * 1.6) + 2
    top = max(0, h - line_h * len(lines) - 3)
    mask = np.zeros((h - top, wd), np.uint8)  # the text is the same in every frame: render it once
    for k, s in enumerate(lines):
        cv2.putText(mask, s, (3, line_h * (k + 1) - line_h // 4), font, scale, 255, 1, cv2.LINE_AA)
    alpha = mask[None, :, :, None].astype(np.float32) / 255.0
    band = frames[:, top:].astype(np.float32) * 0.3
    out = frames.copy()
    out[:, top:] = (band * (1 - alpha) + 255.0 * alpha + 0.5).astype(np.uint8)
    return out


@dataclass(frozen=True)
class Settings:
    preset: str
    dtype: torch.dtype
    resolution: int
    sampling: SamplingConfig


def min_resolution(preset: str) -> int:
    """Smallest multiple of 64 whose deepest UNet level gives GroupNorm(32) more than one value per group."""
    from models.config import XPortraitConfig
    u = XPortraitConfig.from_name(preset).unet
    per_group = u.model_channels * u.channel_mult[-1] // 32
    r = 64
    while per_group * (r // 64) ** 2 < 2:
        r += 64
    return r


def settings(args: argparse.Namespace) -> Settings:
    """Resolve preset-, device- and sampler-dependent defaults; raise ValueError on bad values."""
    from models.config import XPortraitConfig
    preset = args.preset or ("sd15" if args.checkpoint else "tiny")
    if args.depth and not preset.endswith("-rgbd"):
        preset += "-rgbd"
    if not preset.endswith("-rgbd") and (args.depth_mode != "joint" or args.given is not None):
        raise ValueError("--depth-mode/--given need --depth (the rgbd variant)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device (CPU-only build or no GPU): use --device cpu")
    dtype = DTYPES[args.dtype or ("fp16" if args.device == "cuda" else "fp32")]
    resolution = args.resolution or XPortraitConfig.from_name(preset).image_size
    if resolution % 64 or resolution < min_resolution(preset):
        raise ValueError(f"--resolution must be a multiple of 64 and >= {min_resolution(preset)} for preset "
                         f"{preset}, got {resolution}")
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    check_options(args)
    steps = args.steps if args.steps is not None else (DEMO_STEPS if args.checkpoint is None else None)
    window = WindowSpec(args.window, args.overlap, "random" if args.random_offsets else "fixed")
    sampling = SamplingConfig(sampler=args.sampler, steps=steps, cfg_scale=args.cfg, gamma=args.gamma,
                              init=args.init, shared_noise=args.shared_noise, step_noise=args.step_noise,
                              seed=args.seed, window=window).resolved()
    return Settings(preset, dtype, resolution, sampling)


def check_options(args: argparse.Namespace) -> None:
    """Ranges of the sampling options, with their CLI flags, before anything is loaded."""
    import math
    lo, hi = STEP_RANGE[args.sampler]
    if args.steps is not None and not lo <= args.steps <= hi:
        raise ValueError(f"--steps {args.steps}: the {args.sampler} sampler takes {lo} to {hi} steps")
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 1):
        raise ValueError(f"--cfg {args.cfg}: the CFG scale must be >= 1 (1 = off)")
    if not 0 <= args.gamma <= 1:
        raise ValueError(f"--gamma {args.gamma}: TCD stochasticity must be in [0, 1]")
    if args.window < 1:
        raise ValueError(f"--window {args.window}: must be >= 1 (the motion modules were trained on 16)")
    if not 0 <= args.overlap < args.window:
        raise ValueError(f"--overlap {args.overlap}: must be in [0, {args.window - 1}] for --window {args.window}")
    if not math.isfinite(args.lora_scale):
        raise ValueError(f"--lora-scale {args.lora_scale}: must be a finite number")
    if args.best_frame < -2:
        raise ValueError(f"--best-frame {args.best_frame}: use a frame index, -1 (auto) or -2 (none)")


def check_paths(args: argparse.Namespace, preset: str) -> list[Path]:
    """Inputs exist, outputs can be written and are not inputs, and the checkpoint's keys and shapes fit
    the preset (read from its header, checked on the meta device) before any work. Returns the outputs."""
    inputs = {"--source": args.source, "--driving": args.driving, "--checkpoint": args.checkpoint,
              "--sd15-base": args.sd15_base, "--lora": args.lora, "--taesd": args.taesd, "--given": args.given}
    for flag, path in inputs.items():
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if args.checkpoint is not None and args.checkpoint.suffix == ".json":
        raise ValueError(f"--checkpoint {args.checkpoint} is a key manifest, not weights: pass the official "
                         "model_state-*.th (or its .safetensors); check manifests with python -m models.weights check-keys")
    outs = [args.out] + ([] if args.no_preview else [preview_path(args.out)])
    if preset.endswith("-rgbd"):
        outs.append(args.out.with_name(args.out.stem + "_depth.mp4"))  # write_depth's name
    for out in outs:
        check_output_path(out, VIDEO_EXTS, inputs=inputs.values(), flag="--out")
    if args.checkpoint is not None:
        from models.weights import check_keys, file_shapes
        if preset.endswith("-rgbd"):  # an RGB file gets the conversion command, not a shape list
            from models import rgbd
            from models.config import XPortraitConfig
            conv_in = {k: torch.empty(s, device="meta") for k, s in file_shapes(args.checkpoint).items()
                       if k == rgbd.CONV_IN}
            rgbd.check_layout(conv_in, XPortraitConfig.from_name(preset))
        check_keys(args.checkpoint, preset, values=False)
    return outs


def preview_path(out: Path) -> Path:
    return out.with_name(out.stem + "_preview.mp4")


class Progress:
    """One tqdm bar per pipeline stage; `progress(stage, total)` returns the bar's update()."""

    def __init__(self):
        self.bar = None

    def __call__(self, stage: str, total: int):
        from tqdm import tqdm
        self.close()
        self.bar = tqdm(total=total, desc=stage, unit="window" if stage == "denoise" else "frame")
        return self.bar.update

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def write_outputs(out: Path, images: torch.Tensor, source: torch.Tensor, driving: torch.Tensor, fps: float,
                  preview: bool, caption: bool) -> tuple[int, list[Path]]:
    """OUT.mp4 (the frames) and OUT_preview.mp4 (source | driving | output); captions if asked."""
    from runtime.video_io import to_uint8_frames, write_video
    frames = to_uint8_frames(images)
    paths = [out] + ([preview_path(out)] if preview else [])
    with atomic_outputs(paths) as tmp:  # both complete, or neither replaces an earlier run's files
        n = write_video(tmp[0], _caption(frames, SHORT_CAPTION) if caption else frames, fps)
        if preview:
            panels = np.concatenate([np.repeat(to_uint8_frames(source), n, axis=0), to_uint8_frames(driving),
                                     frames], axis=2)
            write_video(tmp[1], _caption(panels, LONG_CAPTION) if caption else panels, fps)
    return n, paths


def depth_inputs(args: argparse.Namespace, preset: str, driving: torch.Tensor) -> dict:
    """animate()'s rgbd arguments: the mode and what it is given. driving: (N, 3, S, S) re-framed frames."""
    if not preset.endswith("-rgbd"):
        return {}
    import cv2

    from models.depth import from_display
    from models.rgbd import RGBDMode
    from runtime.video_io import read_video
    mode = RGBDMode(args.depth_mode, args.known)
    if mode.given is None or (mode.given == "rgb" and args.given is None):
        return {"mode": mode, "given": driving if mode.given else None}
    if args.given is None:
        raise ValueError("--depth-mode depth-to-image needs --given DEPTH_VIDEO (gray, near = white)")
    n, size = driving.shape[0], driving.shape[-1]
    frames = read_video(args.given).frames
    if len(frames) < n:
        raise ValueError(f"--given {args.given} has {len(frames)} frames; the driving clip uses {n}")
    x = torch.from_numpy(np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames[:n]]))
    x = x.permute(0, 3, 1, 2).float() / 255  # (N, 3, S, S) in [0, 1]
    return {"mode": mode, "given": x * 2 - 1 if mode.given == "rgb" else from_display(x.mean(1, keepdim=True))}


def write_depth(out: Path, depth: torch.Tensor, fps: float, caption: bool) -> Path:
    """OUT_depth.mp4: (N, 1, H, W) normalized depth as gray, near = white (models/depth.py)."""
    from models.depth import to_display
    from runtime.video_io import write_video
    gray = (to_display(depth).expand(-1, 3, -1, -1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    path = out.with_name(out.stem + "_depth.mp4")
    write_video(path, _caption(gray, SHORT_CAPTION) if caption else gray, fps)
    return path


def run(args: argparse.Namespace, log=print) -> dict:
    """The whole job; raises on bad input. Returns a summary (frames, fps, paths, seconds, config)."""
    from runtime.preprocess import preprocess
    from runtime.video_io import read_image, read_video

    t0 = time.perf_counter()
    st = settings(args)
    check_paths(args, st.preset)
    source, video = read_image(args.source), read_video(args.driving)
    frames = video.frames[:args.max_frames] if args.max_frames else video.frames
    log(f"driving: {args.driving} ({len(frames)} of {len(video.frames)} frames, {video.fps:g} fps); "
        f"source: {args.source}; working size {st.resolution}x{st.resolution}")
    prep = preprocess(source, frames, resolution=st.resolution, best_frame=args.best_frame,
                      crop_source=not args.no_crop)
    t_prep = time.perf_counter()
    log(f"preprocess: faces in {int(prep.found.sum())}/{len(prep.found)} frames, re-framed to frame "
        f"{prep.best_frame} ({t_prep - t0:.1f} s)")
    models = load_models(st.preset, args.checkpoint, args.sd15_base, args.lora, args.lora_scale, args.taesd,
                         need_taesd="taesd" in (args.encoder, args.decoder), seed=args.seed,
                         device=args.device, dtype=st.dtype)
    for note in models.notes:
        log(("WARNING: " if models.random_weights else "") + note)
    if args.checkpoint is not None:  # NaN/Inf weights (corrupt file, or fp16 overflow of the cast) -> black video
        from models.finite import check_weights_finite
        check_weights_finite(models.model.state_dict().items(), f"the weights loaded from --checkpoint "
                             f"{args.checkpoint} as {str(st.dtype).removeprefix('torch.')}")
    c = st.sampling
    log(f"model: preset {st.preset}, {args.device} {str(st.dtype).removeprefix('torch.')}; sampler {c.sampler} "
        f"{c.steps} steps, CFG {c.cfg_scale:g}, init {c.init}, window {c.window.size}/overlap {c.window.overlap}")
    progress = Progress()
    try:
        result = animate(models.model, models.context, prep.source, prep.driving, prep.local, c,
                         taesd_encoder=models.taesd if args.encoder == "taesd" else None,
                         taesd_decoder=models.taesd if args.decoder == "taesd" else None, progress=progress,
                         **depth_inputs(args, st.preset, prep.driving))
    finally:
        progress.close()
    from models.finite import check_finite
    check_finite(result.latents, "the sampled latents")  # before the frames: which stage broke
    check_finite(result.images, "the decoded frames")
    if result.depth is not None:
        check_finite(result.depth, "the decoded depth")
    t_gen = time.perf_counter()
    n, paths = write_outputs(args.out, result.images, prep.source, prep.driving, video.fps,
                             not args.no_preview, models.random_weights)
    if result.depth is not None:
        paths.append(write_depth(args.out, result.depth, video.fps, models.random_weights))
    t_end = time.perf_counter()
    log(f"wrote {n} frames at {video.fps:g} fps: {', '.join(map(str, paths))} (total {t_end - t0:.1f} s: "
        f"preprocess {t_prep - t0:.1f}, generate {t_gen - t_prep:.1f}, write {t_end - t_gen:.1f})")
    if models.random_weights:
        log("NOTE: these frames come from RANDOM weights, not a portrait model; " + CHECKPOINT_HELP)
    return {"frames": n, "fps": video.fps, "paths": paths, "seconds": t_end - t0, "config": c}


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    run(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit codes (models/cli.py): 0 ok, 1 bad input (NoFaceError, CheckpointError, NonFiniteError, paths),
    2 usage, 3 internal error, 130/143 interrupted (no output left half written)."""
    return run_main(_main, argv, expected=(KeyError,))


if __name__ == "__main__":
    sys.exit(main())
