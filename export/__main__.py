"""python -m export: preset (+ checkpoint) -> ONNX graphs + manifest.json, one folder per precision.

    python -m export --preset tiny --out artifacts/onnx                  # fp16, static shapes, random weights
    python -m export --preset sd15 --checkpoint model_state-415001.th --taesd taesd/ --out artifacts/onnx
    python -m export --preset tiny --out /tmp/x --precision fp32 fp16 --modules hint control --dynamic
    python -m engines build artifacts/onnx/fp16                          # then: TensorRT engines

Writes OUT/<precision>/{NAME.onnx[, NAME.onnx.data], context.safetensors, manifest.json}. The
manifest (engines/manifest.py, docs/engines.md) lists each graph's I/O and profile, when it runs,
the sampler's timesteps and coefficients, and the cache layouts; docs/export.md explains the graphs.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from export.spec import ExportOptions
from export.specs import (DEFAULT_MODULES, ModelSource, build_specs, manifest_caches, manifest_pipeline,
                          manifest_sampler_maths)
from export.to_onnx import EXTERNAL_BYTES, export_graph
from models.cli import add_debug_flag, run_main
from models.fileio import atomic_output, check_output_path
from models.config import PRESETS, XPortraitConfig
from models.rgbd import layout_info

STEP_RANGE = {"ddim": (1, 1000), "lcm": (1, 50), "tcd": (1, 50)}  # models/samplers.py
ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool", 3: "int8", 2: "uint8"}


def sampler_table(cfg: XPortraitConfig, name: str, steps: int) -> dict:
    """Timesteps (use order) and every per-step coefficient the sampler precomputes."""
    from models.samplers import make_sampler
    from models.schedule import ddpm_buffers
    s = make_sampler(name, ddpm_buffers(cfg.schedule)["alphas_cumprod"], steps)
    n = len(s.timesteps)
    coef = {k: [float(x) for x in v] for k, v in sorted(vars(s).items())
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == (n,)}
    return {"name": name, "steps": steps, "prediction": "eps", "timesteps": [int(t) for t in s.timesteps],
            "coefficients": coef}


def _entry(spec, opts, folder: Path, file: Path):
    import onnx

    from engines.cache import onnx_sha256
    from engines.manifest import EngineEntry, FileRef, TensorSpec
    g = onnx.load(str(file), load_external_data=False).graph

    def io(descs, values):
        return [TensorSpec(d.name, spec.symbolic_shape(d, opts), ONNX_DTYPES[v.type.tensor_type.elem_type])
                for d, v in zip(descs, values)]
    return EngineEntry(name=spec.name, runs=spec.runs, onnx=FileRef(file.name, onnx_sha256(file)),
                       inputs=io(spec.inputs, g.input), outputs=io(spec.outputs, g.output), profile=spec.profile(opts))


def export_all(preset: str, out: Path, precisions=("fp16",), modules=DEFAULT_MODULES, opts: ExportOptions | None = None,
               checkpoint=None, taesd=None, lora=None, lora_scale: float = 1.0, context=None, seed: int = 0,
               sampler: str = "ddim", steps: int = 30, external_bytes: int = EXTERNAL_BYTES,
               log=print) -> dict[str, Path]:
    """Export `modules` of `preset`; returns {precision: folder with manifest.json}."""
    from engines.manifest import Manifest
    from safetensors.torch import save_file
    cfg = XPortraitConfig.from_name(preset)
    opts = opts or ExportOptions(latent_hw=(cfg.latent_size,) * 2, window=cfg.motion.window)
    specs = build_specs(cfg)
    unknown = [m for m in modules if m not in specs]
    if unknown:
        raise ValueError(f"unknown module(s) {unknown}; choose from {list(specs)}")
    chosen = [specs[m] for m in specs if m in modules]
    t0 = time.perf_counter()
    source = ModelSource(cfg, checkpoint, taesd, lora, lora_scale, context, seed)
    for note in source.notes:
        log(f"note: {note}")
    folders = {p: Path(out) / p for p in precisions}
    entries: dict[str, list] = {p: [] for p in precisions}
    for k, spec in enumerate(chosen):
        log(f"[{k + 1}/{len(chosen)}] {spec.name} ({spec.runs}): {spec.doc}")
        later = {n for s in chosen[k + 1:] for n in s.needs}

        def release(done=set(spec.needs) - later):  # free weights no later graph needs, before post-processing
            for part in done:
                source.release(part)
        files = export_graph(spec.build(source, opts), spec, opts,
                             {p: folders[p] / f"{spec.name}.onnx" for p in precisions}, log, external_bytes,
                             after_trace=release)
        for p in precisions:
            entries[p].append(_entry(spec, opts, folders[p], files[p][0]))
    preset_info = {"name": cfg.name, "latent_layout": layout_info(cfg.unet),
                   "latent_hw": list(opts.latent_hw), "image_hw": [8 * d for d in opts.latent_hw],
                   "batch": opts.batch, "window": opts.window, "ring_slots": opts.slots, "dynamic": opts.dynamic,
                   "opset": opts.opset,
                   "weights": f"random (seed {seed})" if checkpoint is None else Path(checkpoint).name,
                   "versions": {"torch": torch.__version__, "onnx": __import__("onnx").__version__}}
    for p, folder in folders.items():
        with atomic_output(folder / "context.safetensors") as tmp:
            save_file({"context": source.context.float().contiguous()}, str(tmp))
        m = Manifest(engines=entries[p],
                     sampler={**sampler_table(cfg, sampler, steps), **manifest_sampler_maths(cfg, sampler, steps)},
                     caches=manifest_caches(specs, [s.name for s in chosen], opts),
                     preset={**preset_info, "precision": p},
                     pipeline=manifest_pipeline(specs, [s.name for s in chosen], opts))
        m.save(folder / "manifest.json")
        log(f"wrote {folder / 'manifest.json'} ({len(entries[p])} graphs)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    log(f"done in {time.perf_counter() - t0:.0f} s, peak RSS {rss:.1f} GiB")
    return folders


def _latent(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    try:
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--latent {text!r}: use H or HxW, e.g. 64 or 64x48") from None


def planned_outputs(out: Path, precisions, modules) -> list[Path]:
    """Every file an export writes: OUT/<precision>/{NAME.onnx, NAME.onnx.data, context.safetensors, manifest.json}."""
    files = []
    for p in precisions:
        folder = Path(out) / p
        for m in modules:
            files += [folder / f"{m}.onnx", folder / f"{m}.onnx.data"]
        files += [folder / "context.safetensors", folder / "manifest.json"]
    return files


def validate(a, cfg: XPortraitConfig) -> None:
    """Option ranges, input files and output paths, before any model is built (errors name the flag).
    (--modules is checked by export_all right after the specs are built, before any weights.)"""
    lo, hi = STEP_RANGE[a.sampler]
    if not lo <= a.steps <= hi:
        raise ValueError(f"--steps {a.steps}: the {a.sampler} sampler takes {lo} to {hi} steps")
    for flag, value, low in (("--batch", a.batch, 1), ("--window", a.window, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if a.slots is not None and not 2 <= a.slots <= 24:
        raise ValueError(f"--slots {a.slots}: must be in [2, 24] (the positional table has 24 rows)")
    if a.latent is not None:
        h, w = a.latent
        if h < 8 or w < 8 or h % 8 or w % 8:
            raise ValueError(f"--latent {h}x{w}: each side must be a positive multiple of 8 (the UNet halves it "
                             f"3 times); images are 8x larger ({8 * h}x{8 * w})")
    inputs = {"--checkpoint": a.checkpoint, "--taesd": a.taesd, "--lora": a.lora, "--context": a.context}
    for flag, path in inputs.items():
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if a.out.exists() and not a.out.is_dir():
        raise ValueError(f"--out {a.out} is a file; --out takes a folder (one subfolder per precision)")
    for f in planned_outputs(a.out, a.precision, a.modules):
        check_output_path(f, None, inputs=[v for v in inputs.values() if v is not None and v.is_file()],
                          flag="--out")
    if a.checkpoint is not None:
        from models.weights import check_keys
        check_keys(a.checkpoint, a.preset, values=False)  # keys and shapes on the meta device, named by path


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))  # NAME-rgbd: docs/rgbd.md
    p.add_argument("--out", required=True, type=Path, help="output folder (one subfolder per precision)")
    p.add_argument("--checkpoint", type=Path, help="official X-Portrait weights; without: seeded random weights")
    p.add_argument("--taesd", type=Path, help="TAESD weights: folder with taesd_{encoder,decoder}.pth, or a "
                                              "diffusers AutoencoderTiny file (needed with --checkpoint)")
    p.add_argument("--lora", type=Path, help="LoRA fused into the main UNet (e.g. LCM-LoRA for --sampler lcm)")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--context", type=Path, help="(1, 77, C) text context (.safetensors key 'context'); "
                                                "default: CLIP(\"\") from the checkpoint")
    p.add_argument("--seed", type=int, default=0, help="random weights (as `python -m runtime.animate --seed`)")
    p.add_argument("--precision", nargs="+", default=["fp16"], choices=["fp32", "fp16"])
    p.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES),
                   help=f"graphs to export (default: {' '.join(DEFAULT_MODULES)}; also taesd_encoder, vae_decoder)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch/resolution with min/opt/max profiles")
    p.add_argument("--latent", type=_latent, help="latent size H or HxW (default: the preset's, 64 for sd15)")
    p.add_argument("--batch", type=int, default=1, help="B: frames per call of per-frame graphs / streams")
    p.add_argument("--window", type=int, help="T: frames of the full-window unet (default: the preset's, 16)")
    p.add_argument("--slots", type=int, help="L: temporal ring slots = past frames + 1, 2..24 (default: the window)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "lcm", "tcd"])
    p.add_argument("--steps", type=int, default=30, help="ddim: 1-1000, lcm/tcd: 1-50 (default: 30)")
    p.add_argument("--opset", type=int, default=18)
    add_debug_flag(p)
    a = p.parse_args(argv)
    if a.opset < 18:
        p.error("--opset must be >= 18")
    cfg = XPortraitConfig.from_name(a.preset)
    validate(a, cfg)
    window = a.window or cfg.motion.window
    opts = ExportOptions(latent_hw=a.latent or (cfg.latent_size,) * 2, batch=a.batch, window=window,
                         slots=a.slots or min(window, 24), dynamic=a.dynamic, opset=a.opset)
    export_all(a.preset, a.out, tuple(dict.fromkeys(a.precision)), a.modules, opts, a.checkpoint, a.taesd,
               a.lora, a.lora_scale, a.context, a.seed, a.sampler, a.steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit codes: models/cli.py (0 ok, 1 bad input, 2 usage, 3 internal, 130/143 interrupted)."""
    return run_main(_main, argv, expected=(KeyError,))


if __name__ == "__main__":
    sys.exit(main())
