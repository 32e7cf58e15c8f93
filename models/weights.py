"""Checkpoint formats: the only place that knows file layouts and key names.

* official X-Portrait `model_state-*.th` (torch pickle, loaded with weights_only=True) or the same
  keys as .safetensors                                       -> load_xportrait()
* SD1.5 single-file weights (original LDM keys, .ckpt/.safetensors) as the base of the main UNet,
  the reference net and both ControlNets (+ VAE, + CLIP)      -> load_sd15_base()
* LCM-LoRA / kohya LoRA                                       -> models.lora.fuse_lora()
* TAESD encoder/decoder (.pth Sequential layout, or diffusers AutoencoderTiny) -> load_taesd()

Every loader is strict: missing, unexpected and mis-shaped keys raise CheckpointError naming the
keys and the fix. CLI: `python -m models.weights check-keys FILE --preset sd15`.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from models.schedule import BUFFER_NAMES

TEXT_PREFIX = "cond_stage_model.transformer."
POSITION_IDS = TEXT_PREFIX + "text_model.embeddings.position_ids"  # persistent only in transformers<4.31


class CheckpointError(ValueError):
    """A checkpoint does not match the model; the message names the keys and the fix."""


def _open_safetensors(path: Path):
    from safetensors import safe_open
    try:
        return safe_open(str(path), "pt")
    except Exception as e:  # safetensors raises its own error types (truncated, not safetensors at all)
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt: "
                              "re-download or re-convert it") from None


def _load_pickle(path: Path, mmap: bool = False):
    """torch.load(weights_only=True) with errors that say why the file was refused and what to do."""
    import pickle
    import re
    import zipfile
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_sentence(e)}); "
                                  "it is truncated or corrupt: re-download it") from None
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        if not found:
            m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
            raise CheckpointError(
                f"{path}: refused by torch.load(weights_only=True) ({m.group(1).strip() if m else 'unsupported data'}): "
                "it is not a torch checkpoint, or a pickle whose operations weights-only loading will not run; "
                "pass the official model_state-*.th or a .safetensors file") from None
        what = f" ({', '.join(found)})"
        raise CheckpointError(
            f"{path}: refused: the pickle contains non-tensor objects{what}, and loading them could run "
            "arbitrary code, so torch.load(weights_only=True) will not execute them. If you trust the file, "
            "convert it once to safetensors (allowlist exactly those classes with "
            "torch.serialization.safe_globals([...]), load with weights_only=True, save the tensors with "
            "safetensors.torch.save_file; docs/reliability.md has the recipe) and pass the .safetensors "
            "file") from None
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {_first_sentence(e)}); "
                              "it is truncated or corrupt: re-download it") from None


def _first_sentence(e: Exception, limit: int = 160) -> str:
    """The exception's first sentence on one line (never cut mid-word), or its type if it has no text."""
    text = " ".join(str(e).split())
    end = text.find(". ")
    text = text[:end] if end >= 0 else text.rstrip(".")
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text or type(e).__name__


def _unwrap(path: Path, obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (optionally under 'state_dict'), "
                              f"found {type(obj).__name__}; pass the official X-Portrait model_state-*.th")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch pickle (weights_only=True; unwraps 'state_dict')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as f:
            try:
                return {k: f.get_tensor(k) for k in f.keys()}
            except Exception as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt: "
                                      "re-download or re-convert it") from None
    return _unwrap(path, _load_pickle(path))


def _short(keys: list[str], n: int = 8) -> str:
    head = ", ".join(keys[:n])
    return head + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def diff_keys(expected: dict[str, tuple], provided: dict[str, tuple]) -> tuple[list, list, list]:
    missing = [k for k in expected if k not in provided]
    unexpected = [k for k in provided if k not in expected]
    shapes = [f"{k}: file {tuple(provided[k])} vs model {tuple(expected[k])}"
              for k in expected if k in provided and tuple(provided[k]) != tuple(expected[k])]
    return missing, unexpected, shapes


def raise_on_mismatch(what: str, missing: list, unexpected: list, shapes: list, fix: str) -> None:
    if not (missing or unexpected or shapes):
        return
    parts = [f"{what} does not match the model:"]
    if missing:
        parts.append(f"  missing {len(missing)} keys: {_short(missing)}")
    if unexpected:
        parts.append(f"  unexpected {len(unexpected)} keys: {_short(unexpected)}")
    if shapes:
        parts.append(f"  {len(shapes)} shape mismatches: {_short(shapes, 4)}")
    parts.append(f"  fix: {fix}")
    raise CheckpointError("\n".join(parts))


def _shapes(sd: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def split_text_encoder(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Separate `cond_stage_model.transformer.*` (CLIP) keys; drop the legacy position_ids buffer."""
    text = {k[len(TEXT_PREFIX):]: v for k, v in sd.items() if k.startswith(TEXT_PREFIX) and k != POSITION_IDS}
    rest = {k: v for k, v in sd.items() if not k.startswith(TEXT_PREFIX)}
    return rest, text


def load_xportrait(model, source: str | Path | dict, require_text_encoder: bool = False,
                   name: str | None = None) -> dict:
    """Strictly load an official X-Portrait state dict into `models.xportrait.XPortrait`.

    CLIP weights (`cond_stage_model.*`) are optional in the file: they are loaded if the model has
    a text encoder, and returned otherwise (to compute CLIP("") once). Returns the CLIP state dict.
    name: the file's path for messages when `source` is an already-read dict.
    """
    sd = read_state_dict(source) if not isinstance(source, dict) else source
    name = name or (str(source) if not isinstance(source, dict) else "the checkpoint (in-memory state dict)")
    sd, text = split_text_encoder(sd)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("cond_stage_model.")}
    missing, unexpected, shapes = diff_keys(expected, _shapes(sd))
    if missing or unexpected or shapes:
        _raise_preset_mismatch(name, model.cfg.name, _shapes(sd), missing, unexpected, shapes,
                               "pass the official X-Portrait checkpoint (model_state-*.th) for this preset "
                               f"(--preset {model.cfg.name}); an SD1.5 file belongs to --sd15-base, a LoRA to --lora")
    model.load_state_dict(sd, strict=False)
    if hasattr(model, "cond_stage_model"):
        if text:
            load_text_encoder(model.cond_stage_model.transformer, text, name)
        elif require_text_encoder:
            raise CheckpointError(f"{name} has no cond_stage_model.* (CLIP) weights (they are optional in the "
                                  "file): pass an SD1.5 file with --sd15-base for CLIP")
    return text


def meta_checked(cfg, sd: dict, require_text_encoder: bool = False, name: str | None = None):
    """Check `sd` against an XPortrait of `cfg` built on the meta device; return that (empty) model.

    A wrong file fails in seconds, before 3B parameters are allocated; the caller then materialises
    the model (`to_empty`) or parts of it and loads them strictly.
    """
    import warnings

    from models.xportrait import XPortrait
    with torch.device("meta"):
        model = XPortrait(cfg, with_text_encoder=True).eval()
    with warnings.catch_warnings():  # copying into meta tensors is a no-op, and torch warns per key
        warnings.simplefilter("ignore", UserWarning)
        load_xportrait(model, sd, require_text_encoder=require_text_encoder, name=name)
    return model


def load_text_encoder(clip, text_sd: dict, name: str = "checkpoint") -> None:
    """Load CLIP text weights, accepting both `text_model.*` and the older un-nested layout."""
    if text_sd and not any(k.startswith("text_model.") for k in text_sd):
        text_sd = {"text_model." + k: v for k, v in text_sd.items()}
    text_sd = {k: v for k, v in text_sd.items() if not k.endswith("embeddings.position_ids")}
    missing, unexpected, shapes = diff_keys(_shapes(clip.state_dict()), _shapes(text_sd))
    raise_on_mismatch(f"{name} (CLIP text encoder)", missing, unexpected, shapes,
                      "use the CLIP ViT-L/14 text weights of SD1.5 (cond_stage_model.transformer.*)")
    clip.load_state_dict(text_sd, strict=True)


SD15_IGNORED = ("model_ema.", "lvlb_weights", "cond_stage_model.transformer.text_model.embeddings.position_ids")


def load_sd15_base(model, source: str | Path | dict, name: str | None = None) -> dict[str, list[str]]:
    """Initialise an X-Portrait model from SD1.5 single-file weights (original LDM key names).

    The SD UNet goes to the main UNet, the reference net (no `out`) and both ControlNets (encoder
    and middle block); the VAE and, if present in the model, CLIP are loaded too. Motion modules,
    ControlNet hint encoders and zero convs have no SD1.5 source: they are reported in the return
    value ("not_loaded") and must come from an X-Portrait or AnimateDiff checkpoint.
    """
    sd = read_state_dict(source) if not isinstance(source, dict) else source
    name = name or (str(source) if not isinstance(source, dict) else "the SD1.5 base (in-memory state dict)")
    unet_sd = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    if not unet_sd:
        raise CheckpointError(f"{name} has no model.diffusion_model.* keys: not an SD1.5 single-file checkpoint "
                              "(diffusers folders must be converted to the original single-file layout)")
    vae_sd = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    rest, text = split_text_encoder(sd)
    known = set(BUFFER_NAMES)
    stray = [k for k in rest if not k.startswith(("model.diffusion_model.", "first_stage_model.", *SD15_IGNORED))
             and k not in known]
    raise_on_mismatch(name, [], stray, [], "this is not a plain SD1.5 checkpoint; X-Portrait files go to --checkpoint")
    # the main UNet must consume every SD key (its SD part is exactly SD1.5)
    unet = model.unet
    sd_part = {k: tuple(v.shape) for k, v in unet.state_dict().items() if "motion_module" not in k}
    raise_on_mismatch(f"{name} (SD1.5 UNet)", *diff_keys(sd_part, _shapes(unet_sd)),
                      fix=f"the file's UNet does not fit preset {model.cfg.name}; use an SD1.5 (not SD2/SDXL) checkpoint")
    targets = {"model.diffusion_model.": unet, "appearance_control_model.": model.appearance_control_model,
               "pose_control_model.": model.pose_control_model,
               "local_pose_control_model.": model.local_pose_control_model}
    loaded: set[str] = set()
    for prefix, net in targets.items():
        own = net.state_dict()
        part = {k: v for k, v in unet_sd.items() if k in own and own[k].shape == v.shape}
        net.load_state_dict(part, strict=False)
        loaded.update(prefix + k for k in part)
    vae_expected = {k: tuple(v.shape) for k, v in model.first_stage_model.state_dict().items()}
    raise_on_mismatch(f"{name} (VAE)", *diff_keys(vae_expected, _shapes({k[len('first_stage_model.'):]: v
                                                                       for k, v in vae_sd.items()})),
                      fix="use a checkpoint with the SD kl-f8 VAE under first_stage_model.*")
    model.first_stage_model.load_state_dict({k[len("first_stage_model."):]: v for k, v in vae_sd.items()})
    loaded.update(vae_sd)
    if hasattr(model, "cond_stage_model") and text:
        load_text_encoder(model.cond_stage_model.transformer, text, name)
        loaded.update("cond_stage_model.transformer." + k for k in model.cond_stage_model.transformer.state_dict())
    not_loaded = [k for k in model.state_dict() if k not in loaded and k not in known]
    return {"loaded": sorted(loaded), "not_loaded": not_loaded}


def load_taesd(taesd, encoder: str | Path | dict | None = None, decoder: str | Path | dict | None = None,
               diffusers: str | Path | dict | None = None) -> None:
    """Load TAESD weights: `taesd_encoder.pth`/`taesd_decoder.pth` (or .safetensors) Sequential layout,
    or one diffusers AutoencoderTiny file (keys encoder.layers.N / decoder.layers.N, decoder index
    shifted by one because the Clamp is not a module there)."""
    def get(src):
        return src if isinstance(src, dict) else read_state_dict(src)

    parts = {}
    if diffusers is not None:
        sd = get(diffusers)
        parts["encoder"] = {k[len("encoder.layers."):]: v for k, v in sd.items() if k.startswith("encoder.layers.")}
        parts["decoder"] = {}
        for k, v in sd.items():
            if k.startswith("decoder.layers."):
                idx, rest = k[len("decoder.layers."):].split(".", 1)
                parts["decoder"][f"{int(idx) + 1}.{rest}"] = v
        other = [k for k in sd if not k.startswith(("encoder.layers.", "decoder.layers."))]
        raise_on_mismatch(str(diffusers), [], other, [], "pass a diffusers AutoencoderTiny (TAESD) weight file")
    if encoder is not None:
        parts["encoder"] = get(encoder)
    if decoder is not None:
        parts["decoder"] = get(decoder)
    if not parts:
        raise ValueError("load_taesd needs encoder=, decoder= or diffusers=")
    for which, sd in parts.items():
        net = getattr(taesd, which)
        raise_on_mismatch(f"TAESD {which} weights", *diff_keys(_shapes(net.state_dict()), _shapes(sd)),
                          fix=f"pass the SD1.x taesd_{which}.pth (not taesdxl/taesd3/taef1) for this preset's width")
        net.load_state_dict(sd, strict=True)


# ------------------------------------------------------------------------- key check (meta device)
def expected_shapes(preset: str) -> dict[str, tuple]:
    """Key -> shape of the preset's full model (CLIP included), from a meta-device build (no memory)."""
    return dict(_expected_shapes(preset))


@functools.lru_cache(maxsize=None)
def _expected_shapes(preset: str) -> dict[str, tuple]:
    from models.config import XPortraitConfig
    from models.xportrait import XPortrait
    with torch.device("meta"):
        model = XPortrait(XPortraitConfig.from_name(preset), with_text_encoder=True)
    return _shapes(model.state_dict())


def preset_hint(provided: dict[str, tuple], preset: str) -> str:
    """'the file fits preset X: pass --preset X' when another preset matches every non-CLIP key/shape."""
    from models.config import PRESETS
    own = {k: v for k, v in provided.items() if not k.startswith("cond_stage_model.")}
    for other in PRESETS:
        if other == preset:
            continue
        want = {k: v for k, v in expected_shapes(other).items() if not k.startswith("cond_stage_model.")}
        if own and not any(diff_keys(want, own)):
            return f"the file fits preset {other}, not {preset}: pass --preset {other}"
    return ""


def _raise_preset_mismatch(name: str, preset: str, provided: dict, missing: list, unexpected: list, shapes: list,
                           fix: str) -> None:
    """CheckpointError for a key/shape mismatch; when another preset fits, say that first and briefly."""
    hint = preset_hint(provided, preset)
    if hint:
        raise CheckpointError(f"{name}: {hint} (for preset {preset}: {len(missing)} missing, {len(unexpected)} "
                              f"unexpected, {len(shapes)} mis-shaped keys)")
    raise_on_mismatch(name, missing, unexpected, shapes, fix)


def file_shapes(path: str | Path) -> dict[str, tuple]:
    """Key -> shape from a key manifest (full_keys.json format) or a checkpoint, without reading weights
    where the format allows (safetensors header, memory-mapped zip pickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix == ".json":
        return _manifest_shapes(path)
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return _shapes(_unwrap(path, _load_pickle(path, mmap=True)))


def _manifest_shapes(path: Path) -> dict[str, tuple]:
    form = 'expected {"keys": {"KEY": {"shape": [..]}, ...}} or {"KEY": [..], ...} (like full_keys.json)'
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid JSON key manifest ({e}); {form}") from None
    keys = d.get("keys", d) if isinstance(d, dict) else None
    if not isinstance(keys, dict) or not keys:
        raise CheckpointError(f"{path}: no keys found; {form}")
    out = {}
    for k, v in keys.items():
        shape = v.get("shape") if isinstance(v, dict) else v
        if not isinstance(shape, list) or not all(isinstance(x, int) and x >= 0 for x in shape):
            raise CheckpointError(f"{path}: key {k!r} has no valid shape ({v!r}); {form}")
        out[k] = tuple(shape)
    return out


def manifest_shapes(path: Path) -> dict[str, tuple]:
    """Key -> shape from a key manifest or a checkpoint (alias of file_shapes)."""
    return file_shapes(path)


def nonfinite_keys(path: Path) -> list[str]:
    """Keys of a checkpoint file whose tensors hold NaN/Inf (read one tensor at a time for safetensors)."""
    from models.finite import nonfinite_tensors
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as f:
            return nonfinite_tensors((k, f.get_tensor(k)) for k in f.keys())  # one tensor in memory at a time
    return nonfinite_tensors(_unwrap(path, _load_pickle(path, mmap=True)).items())


def check_keys(path: str | Path, preset: str, values: bool = True) -> tuple[int, dict[str, tuple], list[str]]:
    """Verify every key/shape of FILE maps onto the preset's model (built on the meta device) and, for a
    checkpoint with `values`, that every tensor is finite. Returns (keys in the file, expected, notes).

    CLIP (`cond_stage_model.*`) keys are optional: a file without any is fine (noted); a file with
    some must have them all.
    """
    from models.finite import NonFiniteError
    path = Path(path)
    provided = file_shapes(path)
    expected = expected_shapes(preset)
    notes = []
    if not any(k.startswith("cond_stage_model.") for k in provided):
        expected = {k: v for k, v in expected.items() if not k.startswith("cond_stage_model.")}
        notes.append("no CLIP text-encoder keys (cond_stage_model.*): optional; give CLIP with --sd15-base "
                     "(runtime) or --context (export)")
    if POSITION_IDS in provided:
        from models.config import XPortraitConfig
        want = (1, XPortraitConfig.from_name(preset).clip.max_positions)
        if provided[POSITION_IDS] != want:
            raise CheckpointError(f"{path}: {POSITION_IDS} has shape {provided[POSITION_IDS]}, expected {want}")
        expected[POSITION_IDS] = provided[POSITION_IDS]
    missing, unexpected, shapes = diff_keys(expected, provided)
    if missing or unexpected or shapes:
        _raise_preset_mismatch(str(path), preset, provided, missing, unexpected, shapes,
                               f"the file is not an X-Portrait checkpoint of preset {preset}")
    if values and path.suffix != ".json":
        bad = nonfinite_keys(path)
        if bad:
            raise NonFiniteError(f"{path}: {len(bad)} tensors hold NaN/Inf values ({_short(bad, 5)}): the "
                                 "checkpoint is corrupt and would give black or noisy frames; re-download it")
    return len(provided), expected, notes


# --------------------------------------------------------------------------------------------- CLI
def _main(argv: list[str] | None = None) -> int:
    from models.cli import add_debug_flag
    from models.config import PRESETS
    p = argparse.ArgumentParser(prog="python -m models.weights")
    sub = p.add_subparsers(dest="cmd", required=True)
    ck = sub.add_parser("check-keys", help="verify that every key and shape of FILE maps onto our model")
    ck.add_argument("file", type=Path, help="key manifest (.json like full_keys.json) or checkpoint (.th/.safetensors)")
    ck.add_argument("--preset", default="sd15", choices=sorted(PRESETS))
    ck.add_argument("--skip-values", action="store_true",
                    help="check keys and shapes only (default: also check every tensor is finite)")
    add_debug_flag(ck)
    args = p.parse_args(argv)
    n, expected, notes = check_keys(args.file, args.preset, values=not args.skip_values)
    numel = sum(int(torch.Size(s).numel()) for s in expected.values())
    finite = ", all finite" if not args.skip_values and args.file.suffix != ".json" else ""
    print(f"ok: all {n} keys of {args.file} map onto preset {args.preset} ({numel:,} elements, shapes match{finite})")
    for note in notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from models.cli import run_main
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
