"""Golden parity: `python -m models.golden DIR [--kernels] [--device cpu|cuda] [--tol 1e-4]`.

Loads DIR/config.json and DIR/state.safetensors, recomputes every tensor that DIR/README.json
describes (VAE encode/decode, reference bank, ControlNet residuals, single cond/uncond/CFG
evaluation, the DDIM run, UNet traces) from the golden *inputs* only, and prints max relative
error per tensor (max|ours - golden| / max|golden|). Exit status 1 if any exceeds the tolerance,
if a shape differs from the golden one (no reshaping or broadcasting), or if a golden tensor has
no recipe here (nothing is silently skipped). The 7 inputs are listed but not counted as checks.

Every CFG evaluation goes through the model's own CFG function (`XPortrait.eps_cfg` for the single
evaluation, `eps_from_cache` for each DDIM step, as runtime.pipeline calls it); the per-branch
eps and the UNet traces are read from inside that call by hooks, so the golden run tests the code
path the runtime uses, not a re-implementation of it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from models.config import XPortraitConfig
from models.samplers import DDIM, run_sampler
from models.schedule import q_sample
from models.weights import CheckpointError, load_xportrait
from models.xportrait import Conditioning, XPortrait

TRACE = re.compile(r"^trace\.unet_(cond|uncond)\.(.+)\.(in|out)$")
INPUTS = ("source_image", "pose_hint", "local_hint", "context", "x_noisy", "timesteps", "ddim_noise")
FILES = ("config.json", "state.safetensors", "io.safetensors", "README.json")


class GoldenError(ValueError):
    """The golden set cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class Row:
    """One golden tensor: status 'ok', 'FAIL', 'SHAPE' (shapes differ), 'NOT COMPUTED' or 'input'."""
    name: str
    err: float  # max relative error; nan when not compared
    status: str
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "input")

    @property
    def checked(self) -> bool:
        """Inputs are listed but are not checks."""
        return self.status != "input"


class _UNetRecorder:
    """Records, per branch, what the main UNet does inside one model call.

    The branch of a UNet call is 'cond' when reference K/V are passed, else 'uncond' (the official
    unconditional branch has no reference and no ControlNets). Stores out[f"{prefix}eps_{branch}"]
    and, for every golden trace name of that branch, the traced module's input or output.
    """

    def __init__(self, unet: torch.nn.Module, trace_names: list[str], out: dict, prefix: str = ""):
        self.unet, self.out, self.prefix, self.branch = unet, out, prefix, None
        self.traces = [(n, m.group(1), m.group(2), m.group(3)) for n in trace_names if (m := TRACE.match(n))]
        self.handles: list = []

    def _pre(self, module, args, kwargs):
        self.branch = "cond" if kwargs.get("ref_kv") is not None else "uncond"

    def _post(self, module, args, result):
        self.out[f"{self.prefix}eps_{self.branch}"] = result.detach().clone()

    def __enter__(self) -> "_UNetRecorder":
        self.handles = [self.unet.register_forward_pre_hook(self._pre, with_kwargs=True),
                        self.unet.register_forward_hook(self._post)]
        for name, branch, path, side in self.traces:
            def hook(mod, args, result, name=name, branch=branch, side=side):
                if self.branch == branch:
                    self.out[name] = (args[0] if side == "in" else result).detach().clone()
            self.handles.append(self.unet.get_submodule(path).register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def compute(model: XPortrait, io: dict[str, torch.Tensor], meta: dict, config: dict) -> dict[str, torch.Tensor]:
    """Recompute every golden tensor from the golden inputs (on the model's device). Returns name -> tensor."""
    dev = next(model.parameters()).device
    io = {n: io[n].to(dev) for n in INPUTS}
    got: dict[str, torch.Tensor] = {}
    names = [t["name"] for t in meta["tensors"]]
    T = io["x_noisy"].shape[0]
    ctx, src = io["context"], io["source_image"]
    mean, logvar = model.first_stage_model.encode(src)
    got["vae_posterior_mean"], got["vae_posterior_logvar"] = mean, logvar
    ref = model.cfg.vae.scale_factor * mean
    got["ref_latent"] = ref.expand(T, -1, -1, -1)
    cond = Conditioning(ref_latent=ref, pose_hint=io["pose_hint"], local_hint=io["local_hint"])

    # single evaluation at the golden timestep
    x, t = io["x_noisy"], io["timesteps"].round().long()
    bank = model.reference_bank(ref, t, ctx)
    for i, b in enumerate(bank):
        got.update({n: b for n in names if n.startswith(f"ref_bank.{i:02d}.")})
    pose_f, local_f = model.hint_features(cond.pose_hint, cond.local_hint)
    for prefix, net, feat in (("pose_ctrl", model.pose_control_model, pose_f),
                              ("local_ctrl", model.local_pose_control_model, local_f)):
        for i, r in enumerate(net(x, t, ctx, feat)):
            got[f"{prefix}.{i:02d}"] = r
    scale = float(config["sampler"]["cfg_scale"])
    with _UNetRecorder(model.unet, names, got):
        got["eps_cfg"] = model.eps_cfg(x, t, ctx, cond, scale, frames=T)
        if "eps_uncond" not in got:  # scale 1: the CFG function (rightly) skips the uncond branch
            model.eps_uncond(x, t, ctx, frames=T)

    # the DDIM run, from the official initial latent, each step through eps_from_cache
    sampler = DDIM(model.alphas_cumprod, int(config["sampler"]["steps"]), float(config["sampler"].get("eta", 0.0)))
    got["ddim_timesteps"] = sampler.timesteps.float()
    got["ddim_alphas"] = torch.stack([sampler.alphas, sampler.alphas_prev, sampler.sigmas]).flip(1)
    x_T = q_sample(model.alphas_cumprod, got["ref_latent"], model.cfg.schedule.timesteps - 1, io["ddim_noise"])
    got["ddim_x_T"] = x_T

    def eps_fn(x_in: torch.Tensor, t_i: int, i: int) -> torch.Tensor:
        tt = torch.full((T,), t_i, dtype=torch.long, device=dev)
        with _UNetRecorder(model.unet, [], got, prefix=f"ddim_step{i}."):
            return model.eps_from_cache(x_in, tt, ctx, model.reference_kv(ref, tt, ctx), pose_f, local_f,
                                        scale=scale, frames=T)

    def on_step(i, x_in, eps, out):
        got.update({f"ddim_step{i}.x_in": x_in, f"ddim_step{i}.eps_cfg": eps,
                    f"ddim_step{i}.pred_x0": out.pred_x0, f"ddim_step{i}.x_prev": out.prev})

    got["ddim_final_latent"] = run_sampler(sampler, x_T, eps_fn, on_step)
    got["decoded_frames"] = model.decode(got["ddim_final_latent"])
    return {k: v.cpu() for k, v in got.items()}


def max_rel_err(ours: torch.Tensor, golden: torch.Tensor) -> float:
    """max|ours - golden| / max|golden| in float64; inf for NaN/Inf. Shapes must be equal (ValueError)."""
    if tuple(ours.shape) != tuple(golden.shape):
        raise ValueError(f"shape {tuple(ours.shape)} != golden {tuple(golden.shape)}")
    a, b = ours.double(), golden.double()
    denom = b.abs().max().clamp(min=1e-30)
    err = ((a - b).abs().max() / denom).item()
    return err if math.isfinite(err) else float("inf")


def compare(got: dict[str, torch.Tensor], io: dict[str, torch.Tensor], meta: dict, tol: float) -> list[Row]:
    """One Row per tensor that README.json lists, in its order."""
    rows = []
    for t in meta["tensors"]:
        name = t["name"]
        if name not in io:
            raise GoldenError(f"README.json lists {name!r} but io.safetensors lacks it: the golden set is incomplete")
        if name in INPUTS:
            rows.append(Row(name, float("nan"), "input"))
        elif name not in got:
            rows.append(Row(name, float("nan"), "NOT COMPUTED", "no recipe in models/golden.py"))
        else:
            try:
                err = max_rel_err(got[name], io[name])
            except ValueError as e:
                rows.append(Row(name, float("inf"), "SHAPE", str(e)))
                continue
            rows.append(Row(name, err, "ok" if err <= tol else "FAIL"))
    return rows


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GoldenError(f"{path}: not valid JSON ({e}); copy the golden set again") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types (truncated header/data, not safetensors)
        raise GoldenError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:160]}); it is "
                          "truncated or corrupt: copy the golden set again") from None


def load_model(golden_dir: Path, kernels: bool = False, device: str = "cpu") -> XPortrait:
    """The golden set's model with its weights, on `device`."""
    cfg = XPortraitConfig.from_golden_json(golden_dir / "config.json")
    model = XPortrait(cfg).eval()
    load_xportrait(model, golden_dir / "state.safetensors")
    model.set_attention_kernels(kernels)
    return model.to(device)


def check_dir(golden_dir: Path) -> None:
    if not golden_dir.is_dir():
        raise GoldenError(f"golden set folder {golden_dir} does not exist: pass the folder that holds "
                          f"{', '.join(FILES)} (e.g. ../shared/golden/xportrait)")
    missing = [f for f in FILES if not (golden_dir / f).is_file()]
    if missing:
        raise GoldenError(f"{golden_dir} lacks {', '.join(missing)}: a golden set holds {', '.join(FILES)}")


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GoldenError(f"--device {device}: CUDA is not available here; use --device cpu")


@contextmanager
def strict_fp32():
    """TF32 off for CUDA matmuls and convolutions (cuDNN allows it by default): parity is in fp32."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def run(golden_dir: Path, tol: float, kernels: bool = False, device: str = "cpu") -> list[Row]:
    golden_dir = Path(golden_dir)
    check_dir(golden_dir)
    check_device(device)
    config, meta = _read_json(golden_dir / "config.json"), _read_json(golden_dir / "README.json")
    io = _read_safetensors(golden_dir / "io.safetensors")
    missing = [n for n in INPUTS if n not in io]
    if missing:
        raise GoldenError(f"{golden_dir / 'io.safetensors'} lacks the input(s) {missing}: copy the golden set again")
    with strict_fp32():
        got = compute(load_model(golden_dir, kernels, device), io, meta, config)
    return compare(got, io, meta, tol)


def report(rows: list[Row], tol: float) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'tensor':<{width}}  max rel err  status"]
    for r in rows:
        err = "" if r.status == "input" else f"{r.err:11.3e}"
        lines.append(f"{r.name:<{width}}  {err:>11}  {r.status}" + (f"  {r.note}" if r.note else ""))
    checked = [r for r in rows if r.checked]
    bad = [r for r in checked if not r.ok]
    lines.append(f"{len(checked) - len(bad)} passed, {len(bad)} failed (tolerance {tol:g}); "
                 f"{len(rows) - len(checked)} inputs not compared")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.golden", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="golden set directory (config.json, state/io.safetensors, README.json)")
    p.add_argument("--tol", type=float, default=1e-4, help="max relative error allowed per tensor")
    p.add_argument("--kernels", action="store_true", help="use the Triton attention kernels (CPU: Triton's interpreter)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]; the model and inputs go there")
    args = p.parse_args(argv)
    if args.kernels and not args.device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton's first import, which fixes the mode
    torch.set_grad_enabled(False)
    try:
        rows = run(args.dir, args.tol, args.kernels, args.device)
    except (GoldenError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyError as e:  # a config.json / README.json without a field this runner reads
        print(f"error: {args.dir}: golden set lacks field {e}; copy the golden set again", file=sys.stderr)
        return 2
    print(report(rows, args.tol))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
