"""Mutation check: do the tests catch small realistic bugs? `python -m scripts.mutate [--only NAME ...]`.

Plants each bug of MUTANTS, one at a time, into a temporary COPY of the repository (tracked files
plus untracked files git does not ignore; the working tree is never touched), runs the narrow test
subset that covers the mutated module (`pytest -x`, CI=true so a skip cannot hide a survivor), and
reports which mutants the tests kill. Each subset first runs once unmutated: a subset that fails
without a bug makes its mutants "invalid", not "killed". A mutant whose text is no longer in its
file is "stale" (update the list). Not part of CI: on this project's 2 cores it took 6 minutes when
they were free and 35 minutes when other jobs shared them.

    python -m scripts.mutate                 # all mutants; prints a table and the kill rate
    python -m scripts.mutate --list          # names, files and bug classes
    python -m scripts.mutate --only cfg_scale_ignored --json artifacts/mutants.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden" / "xportrait"

# test subsets (pytest arguments), narrow so that 2 shared cores cope
GOLDEN_T = ("tests/test_golden.py::test_compare_is_strict_about_shapes_and_values",)  # full parity, in process
MODELS_T = GOLDEN_T + ("tests/test_models.py",)
SAMPLERS_T = GOLDEN_T + ("tests/test_samplers.py",)
PIPELINE_T = ("tests/test_pipeline.py", "-k", "not cli")
WINDOWS_T = ("tests/test_windows.py", "tests/test_pipeline.py", "-k", "not cli")
ENGINES_T = ("tests/test_engines.py",)
GOLDEN_RUNNER_T = ("tests/test_golden.py", "-k", "compare or inputs or cfg or generic")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    edits: tuple[tuple[str, str], ...]  # (old, new): each old text must occur exactly once
    tests: tuple[str, ...]
    bug: str


def m(name, file, old, new, tests, bug, *more) -> Mutant:
    return Mutant(name, file, ((old, new), *more), tests, bug)


MUTANTS = [
    # --- the model (golden parity and model behaviour tests)
    m("ref_tokens_dropped", "models/attention.py",
      "    k_all = torch.cat([k, k_ref.expand(b, -1, -1)], dim=1)\n    v_all = torch.cat([v, v_ref.expand(b, -1, -1)], dim=1)\n",
      "    k_all, v_all = k, v\n", MODELS_T, "reference attention ignores the reference tokens"),
    m("cfg_uncond_is_cond", "models/xportrait.py", "return cfg_combine(e_c, self.eps_uncond(x, t, context, frames), scale)",
      "return cfg_combine(e_c, e_c, scale)", MODELS_T, "CFG combines cond with itself (uncond branch skipped)"),
    m("cfg_never_applied", "models/xportrait.py", "        if scale == 1.0:\n            return e_c",
      "        if scale >= 1.0:\n            return e_c", MODELS_T, "CFG scale ignored in the model's eps"),
    m("local_control_dropped", "models/xportrait.py", "return [p + q for p, q in zip(pose, local)]",
      "return [p + p for p, q in zip(pose, local)]", MODELS_T, "local ControlNet residuals replaced by pose"),
    m("reference_net_t0", "models/xportrait.py", "t[:1].expand(b)", "(0 * t[:1]).expand(b)", MODELS_T,
      "reference net run at t=0 instead of the current t"),
    m("decode_one_frame", "models/xportrait.py", "return self.first_stage_model.decode(latent)",
      "return self.first_stage_model.decode(latent[:1])", MODELS_T, "decoder returns one frame of two"),
    m("motion_pe_dropped", "models/motion.py", "        t = t + self.pos_encoder.pe[:, :frames].to(t.dtype)\n", "",
      MODELS_T, "motion module positional encoding dropped"),
    m("control_skip_reversed", "models/unet.py", "skip = skip + control[len(self.output_blocks) - 1 - j]",
      "skip = skip + control[j + 1]", MODELS_T, "ControlNet residuals added to the wrong skips"),
    m("vae_unscaled_latent", "models/vae.py", "return self.cfg.scale_factor * self.encode(x)[0]",
      "return self.encode(x)[0]", PIPELINE_T, "source latent not scaled by 0.18215"),
    # --- samplers
    m("cfg_formula", "models/samplers.py", "return eps_uncond + scale * (eps_cond - eps_uncond)",
      "return eps_cond + scale * (eps_cond - eps_uncond)", SAMPLERS_T, "CFG formula anchored at cond"),
    m("ddim_eps_coeff", "models/samplers.py", "(1 - a_prev - sigma ** 2).sqrt() * eps",
      "(1 - a - sigma ** 2).sqrt() * eps", SAMPLERS_T, "DDIM direction uses a_t instead of a_prev"),
    m("ddim_grid_offset", "models/samplers.py", "return (torch.arange(0, train_steps, c) + 1).flip(0)",
      "return torch.arange(0, train_steps, c).flip(0)", SAMPLERS_T, "DDIM timesteps off by one"),
    m("lcm_cskip_cout_swapped", "models/samplers.py", "denoised = self.c_out[i] * pred_x0 + self.c_skip[i] * x",
      "denoised = self.c_skip[i] * pred_x0 + self.c_out[i] * x", SAMPLERS_T, "LCM boundary scalings swapped"),
    m("init_wrong_t", "models/samplers.py", "alphas_cumprod.shape[0] - 1, noise)", "alphas_cumprod.shape[0] // 2, noise)",
      SAMPLERS_T, "official x_T noised to t=500 instead of 999"),
    m("fixed_noise_redrawn", "models/samplers.py", "        if mode == \"fresh\":\n", "        if mode != \"none\":\n",
      ("tests/test_samplers.py",), "'fixed' step noise redrawn every step"),
    # --- offline pipeline and windows
    m("init_ignored", "runtime/pipeline.py", "x_T = initial_latent(alphas, src.cpu(), noise, cfg.init)",
      "x_T = initial_latent(alphas, src.cpu(), noise, \"noise\")", PIPELINE_T, "animate ignores --init official"),
    m("cfg_scale_ignored", "runtime/pipeline.py",
      "denoiser = Denoiser(model, z_src, context, pose_hint, local_hint, cfg.cfg_scale)",
      "denoiser = Denoiser(model, z_src, context, pose_hint, local_hint, 1.0)", PIPELINE_T,
      "animate runs at CFG 1 while reporting the asked scale"),
    m("offsets_seed_lost", "runtime/pipeline.py",
      "window = replace(cfg.window, seed=cfg.seed) if cfg.window.offsets == \"random\" else cfg.window",
      "window = cfg.window", PIPELINE_T, "random window offsets ignore the run's seed"),
    m("step_noise_ignored", "runtime/pipeline.py", "step_noise_fn(sampler, n, shape, gen, cfg.step_noise, cfg.shared_noise,",
      "step_noise_fn(sampler, n, shape, gen, \"fresh\", cfg.shared_noise,", PIPELINE_T,
      "animate ignores --step-noise fixed"),
    m("shared_noise_ignored", "runtime/pipeline.py", "noise = draw_noise(n, shape, gen, cfg.shared_noise)",
      "noise = draw_noise(n, shape, gen)", PIPELINE_T, "animate ignores --shared-noise for x_T"),
    m("stale_reference_kv", "runtime/pipeline.py", "        if self._kv_t != t:\n", "        if self._kv is None:\n",
      PIPELINE_T, "reference K/V of the first step reused at every step"),
    m("hint_window_index", "runtime/pipeline.py", "ctx, self.reference_kv(t), self.pose_feat[idx],",
      "ctx, self.reference_kv(t), self.pose_feat[:f],", PIPELINE_T,
      "hint features of the first frames used for every window"),
    m("windows_summed", "runtime/windows.py", "return (total / counts.view(-1, *([1] * (x.ndim - 1)))).to(x.dtype)",
      "return total.to(x.dtype)", WINDOWS_T, "overlapping windows summed, not averaged"),
    m("random_offsets_ignored", "runtime/windows.py", "        if self.spec.offsets == \"fixed\":\n            return 0",
      "        if True:\n            return 0", WINDOWS_T, "random offsets never drawn"),
    m("local_patch_size", "runtime/preprocess.py", "    hs = frame.shape[-1] // 8\n", "    hs = frame.shape[-1] // 16\n",
      ("tests/test_preprocess.py",), "eyes/mouth patches half the official size"),
    m("ring_no_wrap", "models/streaming.py", "        write_slot.add_(1).remainder_(slots)\n",
      "        write_slot.add_(1).clamp_(max=slots - 1)\n", ("tests/test_streaming.py",),
      "streaming ring buffer never wraps"),
    # --- engine cache and build
    m("plan_sha_unchecked", "engines/cache.py",
      "if size != side.get(\"engine_bytes\") or sha256_file(engine_path) != side.get(\"engine_sha256\"):",
      "if size != side.get(\"engine_bytes\"):", ENGINES_T, "cache accepts a same-size plan with other bytes"),
    m("build_hashes_graph_only", "engines/build.py", "onnx_digest or cache.onnx_sha256(onnx_path)",
      "onnx_digest or cache.sha256_file(onnx_path)", ENGINES_T, "build key ignores the ONNX external data"),
    Mutant("sidecar_before_plan", "engines/build.py",
           (("    cache.atomic_write(engine_path, plan)\n", ""),
            ("    cache.write_json(cache.sidecar_path(engine_path), side)\n",
             "    cache.write_json(cache.sidecar_path(engine_path), side)\n    cache.atomic_write(engine_path, plan)\n")),
           ENGINES_T, "sidecar written before the plan (a crash leaves a valid-looking stale pair)"),
    m("key_ignores_profile", "engines/cache.py", "if mine.get(k) != other.get(k))",
      "if k != \"profile\" and mine.get(k) != other.get(k))", ENGINES_T, "a profile change does not rebuild"),
    # --- checkpoints, kernels, the golden runner itself
    m("loader_not_strict", "models/weights.py",
      "    if missing or unexpected or shapes:\n        _raise_preset_mismatch(name, model.cfg.name,",
      "    if False:\n        _raise_preset_mismatch(name, model.cfg.name,", ("tests/test_weights.py",), "checkpoint keys not checked"),
    m("kernel_scale", "kernels/reference_attention.py", "scale = (q.shape[-1] // heads) ** -0.5 if scale is None",
      "scale = (q.shape[-1] // heads + 1) ** -0.5 if scale is None", ("tests/test_kernels.py", "-k", "small_head_dims"),
      "fused attention kernel launched with the wrong softmax scale"),
    m("golden_reshapes", "models/golden.py",
      "    if tuple(ours.shape) != tuple(golden.shape):\n        raise ValueError(",
      "    if ours.numel() == golden.numel():\n        ours = ours.reshape(golden.shape)\n"
      "    elif tuple(ours.shape) != tuple(golden.shape):\n        raise ValueError(", GOLDEN_RUNNER_T,
      "golden comparator reshapes a wrong-shaped result"),
]


def repo_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, check=True,
                         capture_output=True).stdout.decode()
    return sorted(f for f in set(out.split("\0")) if f and (root / f).is_file())


def copy_repo(root: Path, dest: Path) -> None:
    for f in repo_files(root):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, dest / f)


def env_for(copy: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env.update(PYTHONPATH=str(copy), CI="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1", XPORTRAIT_GOLDEN=os.environ.get("XPORTRAIT_GOLDEN", str(GOLDEN)))
    return env


def check_isolated(copy: Path, env: dict) -> None:
    """The copy's modules, not the working tree's (the editable install), must be the ones imported."""
    code = "import models.xportrait, runtime.pipeline, engines.cache as c; print(c.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True)
    if out.returncode != 0 or not Path(out.stdout.strip()).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"the copy does not import its own modules: {out.stdout.strip()} {out.stderr[-500:]}")


def run_tests(copy: Path, env: dict, tests: tuple[str, ...], timeout: int) -> tuple[str, float]:
    """'pass', 'fail' (pytest exit 1-4) or 'timeout', and the seconds taken."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout,
                           preexec_fn=lambda: os.nice(10))
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0
    if r.returncode == 5:
        raise RuntimeError(f"no tests collected by {' '.join(tests)}: fix the mutant's test subset")
    return ("pass" if r.returncode == 0 else "fail"), time.monotonic() - t0


def apply(copy: Path, mutant: Mutant) -> str | None:
    """Plant the mutant; returns the original text, or None if the mutant is stale."""
    path = copy / mutant.file
    original = path.read_text()
    text = original
    for old, new in mutant.edits:
        if text.count(old) != 1:
            return None
        text = text.replace(old, new)
    path.write_text(text)
    return original


def run(mutants: list[Mutant], timeout: int, log=print) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="xportrait-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repo(ROOT, copy)
        env = env_for(copy)
        check_isolated(copy, env)
        baseline: dict[tuple, str] = {}
        for mu in mutants:
            if mu.tests not in baseline:
                baseline[mu.tests], secs = run_tests(copy, env, mu.tests, timeout)
                log(f"baseline {' '.join(mu.tests)}: {baseline[mu.tests]} ({secs:.0f} s)")
            status, secs = "invalid", 0.0
            if baseline[mu.tests] == "pass":
                original = apply(copy, mu)
                if original is None:
                    status = "stale"
                else:
                    try:
                        outcome, secs = run_tests(copy, env, mu.tests, timeout)
                    finally:
                        (copy / mu.file).write_text(original)
                    status = {"pass": "SURVIVED", "fail": "killed", "timeout": "killed (timeout)"}[outcome]
            results.append({**asdict(mu), "status": status, "seconds": round(secs, 1)})
            log(f"{mu.name:<24} {status:<16} {secs:6.0f} s  {mu.bug}")
    return results


def summary(results: list[dict]) -> str:
    valid = [r for r in results if r["status"] not in ("stale", "invalid")]
    killed = [r for r in valid if r["status"].startswith("killed")]
    lines = [f"killed {len(killed)} of {len(valid)} mutants ({100 * len(killed) / max(1, len(valid)):.0f}%)"]
    lines += [f"survived: {r['name']} ({r['file']}): {r['bug']}" for r in valid if r["status"] == "SURVIVED"]
    lines += [f"{r['status']}: {r['name']} ({r['file']})" for r in results if r["status"] in ("stale", "invalid")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.mutate", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per test run (default 1200)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--tests", nargs="+", metavar="ARG",
                   help="run the chosen mutants against these pytest arguments instead of their own subsets "
                        "(e.g. to show that one behaviour test alone kills its bug)")
    args = p.parse_args(argv)
    names = {mu.name for mu in MUTANTS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        print(f"error: unknown mutant(s) {unknown}; see --list", file=sys.stderr)
        return 2
    chosen = [mu for mu in MUTANTS if not args.only or mu.name in args.only]
    if args.tests:
        chosen = [replace(mu, tests=tuple(args.tests)) for mu in chosen]
    if args.list:
        for mu in chosen:
            print(f"{mu.name:<24} {mu.file:<32} {mu.bug}")
        return 0
    try:
        results = run(chosen, args.timeout)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
