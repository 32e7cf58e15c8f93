"""Golden parity: `python -m models.golden DIR [--kernels] [--tol 1e-4]`.

Loads DIR/config.json and DIR/state.safetensors, recomputes every tensor that DIR/README.json
describes (VAE encode/decode, reference bank, ControlNet residuals, single cond/uncond/CFG
evaluation, the DDIM run, UNet traces) from the golden *inputs* only, and prints max relative
error per tensor (max|ours - golden| / max|golden|). Exit status 1 if any exceeds the tolerance
or if a golden tensor has no recipe here (nothing is silently skipped).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.config import XPortraitConfig
from models.samplers import DDIM, cfg_combine, run_sampler
from models.schedule import q_sample
from models.weights import load_xportrait
from models.xportrait import Conditioning, XPortrait

TRACE = re.compile(r"^trace\.unet_(cond|uncond)\.(.+)\.(in|out)$")


def _trace_hooks(unet: torch.nn.Module, names: list[str], branch: str, out: dict) -> list:
    handles = []
    for name in names:
        m = TRACE.match(name)
        if not m or m.group(1) != branch:
            continue
        module = unet.get_submodule(m.group(2))

        def hook(mod, args, result, name=name, side=m.group(3)):
            out[name] = (args[0] if side == "in" else result).detach().clone()
        handles.append(module.register_forward_hook(hook))
    return handles


@torch.no_grad()
def compute(model: XPortrait, io: dict[str, torch.Tensor], meta: dict, config: dict) -> dict[str, torch.Tensor]:
    """Recompute every golden tensor from the golden inputs. Returns name -> tensor."""
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
    traces: dict[str, torch.Tensor] = {}
    hooks = _trace_hooks(model.unet, names, "cond", traces)
    got["eps_cond"] = model.eps_cond(x, t, ctx, cond, frames=T)
    for h in hooks:
        h.remove()
    hooks = _trace_hooks(model.unet, names, "uncond", traces)
    got["eps_uncond"] = model.eps_uncond(x, t, ctx, frames=T)
    for h in hooks:
        h.remove()
    got.update(traces)
    scale = float(config["sampler"]["cfg_scale"])
    got["eps_cfg"] = cfg_combine(got["eps_cond"], got["eps_uncond"], scale)

    # the DDIM run, from the official initial latent
    sampler = DDIM(model.alphas_cumprod, int(config["sampler"]["steps"]), float(config["sampler"].get("eta", 0.0)))
    got["ddim_timesteps"] = sampler.timesteps.float()
    got["ddim_alphas"] = torch.stack([sampler.alphas, sampler.alphas_prev, sampler.sigmas]).flip(1)
    x_T = q_sample(model.alphas_cumprod, got["ref_latent"], model.cfg.schedule.timesteps - 1, io["ddim_noise"])
    got["ddim_x_T"] = x_T

    def eps_fn(x_in: torch.Tensor, t_i: int, i: int) -> torch.Tensor:
        tt = torch.full((T,), t_i, dtype=torch.long)
        e_c, e_u = model.eps_cond(x_in, tt, ctx, cond, frames=T), model.eps_uncond(x_in, tt, ctx, frames=T)
        got.update({f"ddim_step{i}.eps_cond": e_c, f"ddim_step{i}.eps_uncond": e_u})
        return cfg_combine(e_c, e_u, scale)

    def on_step(i, x_in, eps, out):
        got.update({f"ddim_step{i}.x_in": x_in, f"ddim_step{i}.eps_cfg": eps,
                    f"ddim_step{i}.pred_x0": out.pred_x0, f"ddim_step{i}.x_prev": out.prev})

    got["ddim_final_latent"] = run_sampler(sampler, x_T, eps_fn, on_step)
    got["decoded_frames"] = model.decode(got["ddim_final_latent"])
    for n in ("source_image", "pose_hint", "local_hint", "context", "x_noisy", "timesteps", "ddim_noise"):
        got[n] = io[n]  # inputs: compared to themselves only to keep the table complete
    return got


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        if a.numel() == b.numel() or a.shape[1:] == b.shape[1:]:
            a = a.reshape(b.shape) if a.numel() == b.numel() else a[: b.shape[0]]
        else:
            return float("inf")
    denom = b.abs().max().clamp(min=1e-30)
    err = ((a - b).abs().max() / denom).item()
    return err if err == err else float("inf")  # NaN -> inf


def run(golden_dir: Path, tol: float, kernels: bool = False) -> list[tuple[str, float, bool]]:
    golden_dir = Path(golden_dir)
    for f in ("config.json", "state.safetensors", "io.safetensors", "README.json"):
        if not (golden_dir / f).is_file():
            raise FileNotFoundError(f"{golden_dir / f} is missing: a golden set holds config.json, "
                                    "state.safetensors, io.safetensors and README.json")
    config = json.loads((golden_dir / "config.json").read_text())
    meta = json.loads((golden_dir / "README.json").read_text())
    cfg = XPortraitConfig.from_golden_json(golden_dir / "config.json")
    model = XPortrait(cfg).eval()
    load_xportrait(model, golden_dir / "state.safetensors")
    model.set_attention_kernels(kernels)
    io = load_file(str(golden_dir / "io.safetensors"))
    got = compute(model, io, meta, config)
    rows = []
    for t in meta["tensors"]:
        name = t["name"]
        err = max_rel_err(got[name], io[name]) if name in got else float("nan")
        rows.append((name, err, name in got and err <= tol))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.golden", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="golden set directory (config.json, state/io.safetensors, README.json)")
    p.add_argument("--tol", type=float, default=1e-4, help="max relative error allowed per tensor")
    p.add_argument("--kernels", action="store_true", help="use the Triton attention kernels (TRITON_INTERPRET=1 on CPU)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        rows = run(args.dir, args.tol, args.kernels)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(r[0]) for r in rows)
    print(f"{'tensor':<{width}}  max rel err  status")
    for name, err, ok in rows:
        status = "ok" if ok else ("NOT COMPUTED" if err != err else "FAIL")
        print(f"{name:<{width}}  {err:11.3e}  {status}")
    bad = [r for r in rows if not r[2]]
    print(f"{len(rows) - len(bad)} passed, {len(bad)} failed (tolerance {args.tol:g})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
