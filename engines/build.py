"""ONNX -> TensorRT plan, one builder for `tensorrt` and `tensorrt_rtx`.

- Strongly typed networks: precision comes from the ONNX graph (fp16 graph -> fp16 engine);
  no FP16/BF16 builder flags.
- One optimization profile (min/opt/max per dynamic input), a workspace limit, the builder
  optimization level, and (full TensorRT only) a timing cache shared by all engines in a folder.
- Cached by build key (engines/cache.py): a plan is rebuilt when the ONNX content, builder,
  version, targets, profile or options change, or when the plan on disk is corrupt.

Idea from NVIDIA/TensorRT demo/Diffusion (engine.py, version-keyed plans); written from scratch
on the builder API (no polygraphy).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engines import cache, trt_import
from engines.cache import BuildKey, EngineCacheError

log = logging.getLogger(__name__)

RTX_TARGETS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_120", "sm_121")
RTX_DEFAULT = "rtx_default"  # builder default: portable across SM 8.0/8.6/8.9/12.x

Shape = Sequence[int]
Profile = Mapping[str, "tuple[Shape, Shape, Shape] | Mapping[str, Shape]"]


class BuildError(RuntimeError):
    """The ONNX could not be parsed or TensorRT could not build it."""


@dataclass
class BuildConfig:
    flavour: str = "auto"  # "auto" | "tensorrt" | "tensorrt_rtx"
    targets: tuple[str, ...] = ()  # RTX only, e.g. ("sm_89",); () = RTX portable default
    workspace_mib: int = 4096  # scratch memory limit for tactics
    opt_level: int = 3  # builder optimization level 0..5 (0 is fast for tests)
    detailed_profiling: bool = True  # keep layer precisions visible to the engine inspector
    timing_cache: Path | None = None  # full TensorRT; default: <engine dir>/timing-<builder>-<ver>-<sm>.cache
    rebuild: str = "auto"  # "auto": rebuild stale/corrupt plans; "never": raise; "always"
    verbose: bool = False


@dataclass
class BuildResult:
    engine: Path
    key: BuildKey
    built: bool  # False on a cache hit
    reason: str  # why it was built, or "cache hit"
    seconds: float = 0.0
    timing_cache: str | None = None  # "loaded" | "new" | None (flavour has none)
    sidecar: dict = field(default_factory=dict)


def normalize_profile(profile: Profile | None) -> dict[str, dict[str, list[int]]]:
    """{name: (min, opt, max)} or {name: {"min":..,"opt":..,"max":..}} -> canonical dict of lists."""
    out = {}
    for name, shapes in (profile or {}).items():
        if isinstance(shapes, Mapping):
            shapes = (shapes["min"], shapes["opt"], shapes["max"])
        if len(shapes) != 3:
            raise ValueError(f"profile[{name!r}]: need (min, opt, max) shapes, got {shapes!r}")
        out[name] = {k: [int(d) for d in s] for k, s in zip(("min", "opt", "max"), shapes)}
    return dict(sorted(out.items()))


def resolve_targets(fl: trt_import.Flavour, targets: Sequence[str]) -> list[str]:
    """Compute-capability targets for the build key, as "sm_XY" strings."""
    if fl.is_rtx:
        bad = [t for t in targets if t not in RTX_TARGETS]
        if bad:
            raise ValueError(f"unknown RTX target(s) {bad}; use some of {RTX_TARGETS} "
                             "(Hopper sm_90 is not an RTX target: build it with full tensorrt)")
        return sorted(set(targets), key=RTX_TARGETS.index) or [RTX_DEFAULT]
    import torch  # full TensorRT builds for the GPU it runs on

    if not torch.cuda.is_available():
        raise BuildError("full tensorrt needs a CUDA GPU to build; use --trt tensorrt_rtx to build "
                         "ahead of time on a CPU-only machine (RTX GPUs only)")
    major, minor = torch.cuda.get_device_capability()
    current = f"sm_{major}{minor}"
    if targets and list(targets) != [current]:
        raise ValueError(f"full tensorrt builds for the current GPU ({current}) only; drop targets {list(targets)}")
    return [current]


def build_key(fl, onnx_digest: str, targets: list[str], profile: dict, config: BuildConfig) -> BuildKey:
    options = {"strongly_typed": True, "opt_level": config.opt_level,
               "workspace_mib": config.workspace_mib, "detailed_profiling": config.detailed_profiling}
    return BuildKey(onnx_digest, fl.name, fl.version, targets, profile, options)


def build_engine(onnx_path: str | Path, engine_path: str | Path, profile: Profile | None = None,
                 config: BuildConfig | None = None, onnx_digest: str | None = None) -> BuildResult:
    """Build `onnx_path` into `engine_path` (+ sidecar), or reuse the cached plan if its key matches."""
    config = config or BuildConfig()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if config.rebuild not in ("auto", "never", "always"):
        raise ValueError(f"rebuild={config.rebuild!r}; use 'auto', 'never' or 'always'")
    fl = trt_import.load(config.flavour)
    trt_import.set_verbose(fl, config.verbose)
    prof = normalize_profile(profile)
    key = build_key(fl, onnx_digest or cache.onnx_sha256(onnx_path), resolve_targets(fl, config.targets),
                    prof, config)

    reason = "rebuild=always" if config.rebuild == "always" else cache.check(engine_path, key)
    if reason is None:
        log.info("%s: cache hit", engine_path.name)
        return BuildResult(engine_path, key, False, "cache hit", sidecar=cache.read_sidecar(engine_path))
    if config.rebuild == "never":
        raise EngineCacheError(f"{engine_path}: {reason}. Fix: run `python -m engines build` "
                               "(or allow rebuilds) to regenerate it")
    log.info("%s: building (%s)", engine_path.name, reason)
    return _build(fl, onnx_path, engine_path, key, reason, config)


def _parse(fl, onnx_path: Path):
    trt = fl.trt
    builder = trt.Builder(fl.logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, fl.logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{fl.name} could not parse {onnx_path}:\n  {errors}")
    return builder, network, parser


def _add_profile(fl, builder, network, bconfig, prof: dict, onnx_path: Path) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = {t.name for t in inputs}
    unknown = sorted(set(prof) - names)
    if unknown:
        raise ValueError(f"profile (--shape) names unknown input(s) {unknown}; {onnx_path.name} has {sorted(names)}")
    dynamic = [t for t in inputs if -1 in tuple(t.shape)]
    missing = [t.name for t in dynamic if t.name not in prof]
    if missing:
        shapes = {t.name: tuple(t.shape) for t in dynamic}
        raise ValueError(f"{onnx_path.name}: dynamic input(s) {missing} need a min/opt/max profile "
                         f"(shapes {shapes}); e.g. --shape {missing[0]}:1x...,2x...,4x...")
    if not prof:
        return
    p = builder.create_optimization_profile()
    for t in inputs:
        if t.name not in prof:
            continue
        s = prof[t.name]
        _check_profile_shape(t.name, tuple(t.shape), s)
        p.set_shape(t.name, s["min"], s["opt"], s["max"])
    bconfig.add_optimization_profile(p)


def _check_profile_shape(name: str, net_shape: tuple, s: dict) -> None:
    for k in ("min", "opt", "max"):
        if len(s[k]) != len(net_shape):
            raise ValueError(f"profile[{name!r}].{k} (--shape {name}:MIN,OPT,MAX): rank {len(s[k])} but the input "
                             f"has shape {net_shape}")
        for d, (want, got) in enumerate(zip(net_shape, s[k])):
            if want != -1 and want != got:
                raise ValueError(f"profile[{name!r}].{k}[{d}] = {got} but that dim is static ({want})")
    if not all(a <= b <= c for a, b, c in zip(s["min"], s["opt"], s["max"])):
        raise ValueError(f"profile[{name!r}]: need min <= opt <= max per dim, got {s}")


def _timing_cache_path(config: BuildConfig, engine_path: Path, key: BuildKey) -> Path:
    name = f"timing-{key.builder}-{key.builder_version}-{key.targets[0]}.cache"
    return config.timing_cache or engine_path.parent / name


def _builder_config(fl, builder, key: BuildKey, config: BuildConfig):
    trt = fl.trt
    bconfig = builder.create_builder_config()
    bconfig.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    bconfig.builder_optimization_level = config.opt_level
    if config.detailed_profiling:
        bconfig.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if fl.is_rtx and key.targets != [RTX_DEFAULT]:
        bconfig.num_compute_capabilities = len(key.targets)
        for i, t in enumerate(key.targets):
            bconfig.set_compute_capability(getattr(trt.ComputeCapability, t.replace("_", "").upper()), i)
    return bconfig


def _load_timing_cache(bconfig, path: Path) -> str:
    data = path.read_bytes() if path.is_file() else b""
    try:
        tc = bconfig.create_timing_cache(data)
    except Exception as e:  # corrupt or foreign cache: start a new one, never fail the build
        log.warning("ignoring unreadable timing cache %s (%s)", path, e)
        data, tc = b"", bconfig.create_timing_cache(b"")
    bconfig.set_timing_cache(tc, False)  # ignore_mismatch=False: drop entries from another device
    return "loaded" if data else "new"


def _build(fl, onnx_path: Path, engine_path: Path, key: BuildKey, reason: str, config: BuildConfig) -> BuildResult:
    from engines import inspect_engine

    t0 = time.perf_counter()
    builder, network, _parser = _parse(fl, onnx_path)
    bconfig = _builder_config(fl, builder, key, config)
    _add_profile(fl, builder, network, bconfig, key.profile, onnx_path)
    tc_path, tc_state = _timing_cache_path(config, engine_path, key), None
    if fl.has_timing_cache:
        tc_state = _load_timing_cache(bconfig, tc_path)

    fl.logger.layer_report = None
    plan = builder.build_serialized_network(network, bconfig)
    if plan is None:
        raise BuildError(f"{fl.name} {fl.version} failed to build {onnx_path}; rerun with -v for the builder log")
    seconds = time.perf_counter() - t0

    cache.atomic_write(engine_path, plan)
    if fl.has_timing_cache:
        cache.atomic_write(tc_path, bconfig.get_timing_cache().serialize())
    live, note = inspect_engine.engine_info(fl, plan)
    logged = inspect_engine.parse_layer_report(fl.logger.layer_report)
    if live is not None:
        layers, source = live["layers"], "sidecar (engine inspector at build time)"
    elif logged is not None:
        layers, source = logged, inspect_engine.LOG_SOURCE
    else:
        layers, source = None, None
    side = {
        "format": "xportrait-engine-sidecar/1",
        "onnx": onnx_path.name,
        "key": key.to_dict(),
        "key_digest": key.digest(),
        "engine_sha256": hashlib.sha256(memoryview(plan)).hexdigest(),
        "engine_bytes": plan.nbytes,
        "build_seconds": round(seconds, 3),
        "build_reason": reason,
        "io": inspect_engine.network_io(network, key.profile),
        "network_layers": inspect_engine.network_layers(network),
        "engine_layers": layers,
        "engine_layers_source": source,
        "build_note": note,
    }
    cache.write_json(cache.sidecar_path(engine_path), side)
    log.info("%s: built in %.1fs (%d bytes)", engine_path.name, seconds, side["engine_bytes"])
    return BuildResult(engine_path, key, True, reason, seconds, tc_state, side)


# ---------------------------------------------------------------- manifests

def _check_io(entry, io: list[dict]) -> None:
    """The manifest's I/O names and dtypes must be the plan's: the C++ host binds by them."""
    from engines.manifest import ManifestError

    want = {(t.name, t.dtype) for t in entry.inputs + entry.outputs}
    have = {(t["name"], t["dtype"]) for t in io}
    if want != have:
        raise ManifestError([f"engine {entry.name!r}: manifest I/O {sorted(want - have)} vs ONNX "
                             f"{sorted(have - want)}; re-export so the manifest matches the graph"])


def build_manifest(folder: str | Path, config: BuildConfig | None = None,
                   only: Sequence[str] = ()) -> list[BuildResult]:
    """Build every engine a manifest lists (or those named in `only`) and record them in it."""
    from engines.manifest import FILENAME, BuildInfo, FileRef, Manifest, ManifestError

    folder, config = Path(folder), config or BuildConfig()
    path = folder / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {FILENAME}; export first, or pass .onnx files")
    m = Manifest.load(path)
    unknown = sorted(set(only) - {e.name for e in m.engines})
    if unknown:
        raise ManifestError([f"--only {unknown}: not in the manifest ({[e.name for e in m.engines]})"], str(path))
    results = []
    for e in m.engines:
        if only and e.name not in only:
            continue
        onnx_path = folder / e.onnx.file
        digest = cache.onnx_sha256(onnx_path)
        if digest != e.onnx.sha256:
            raise ManifestError([f"engine {e.name!r}: {e.onnx.file} changed since export (onnx.sha256 differs); "
                                 "re-export, or rewrite onnx.sha256 with engines.cache.onnx_sha256"], str(path))
        engine_file = e.engine.file if e.engine else f"{e.name}.plan"
        r = build_engine(onnx_path, folder / engine_file, e.profile, config, onnx_digest=digest)
        _check_io(e, r.sidecar["io"])
        k = r.key
        e.engine = FileRef(engine_file, r.sidecar["engine_sha256"])
        e.build = BuildInfo(k.builder, k.builder_version, k.targets, k.options, k.digest())
        m.save(path)  # after each engine: a later failure keeps what was built
        results.append(r)
    return results
