"""The engine manifest: `manifest.json` next to the ONNX files and plans (schema xportrait-engines/2).

The exporter writes it with the ONNX side filled (files, hashes, I/O, profiles, `runs`, sampler,
caches, pipeline, preset); `python -m engines build DIR` adds each engine's plan file, hash and
build key fields; the Python runtime and the C++ host (host/) read it to find and check the plans.
Schema 2 adds what a host in another language needs to run the streaming pipeline from the
manifest alone: `pipeline` (which graph runs when, which output feeds which input, the ring
protocol, image layouts and value ranges) and, in `sampler`, the per-step affine update and the
initial latent. The format is described field by field in docs/engines.md. Validation is strict
(unknown fields are errors) and every error names the field and the fix.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engines import cache

SCHEMA = "xportrait-engines/2"
PROTOCOL = "xportrait-stream/1"  # pipeline.protocol: the streaming protocol of docs/host.md
FILENAME = "manifest.json"
RUNS = ("per_source", "per_source_step", "per_frame", "per_frame_step")
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")
BUILDERS = ("tensorrt", "tensorrt_rtx")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_DIM = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9_*/+-]+$")  # "B", "H", "8H", "H/8"
_SHA = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """The manifest does not follow the schema; `errors` lists each problem with its field."""

    def __init__(self, errors: list[str], where: str = "manifest"):
        self.errors = errors
        super().__init__(f"{where}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]  # static ints, or named dynamic dims ("B")
    dtype: str  # one of DTYPES


@dataclass
class FileRef:
    file: str  # relative to the manifest's folder
    sha256: str  # onnx: engines.cache.onnx_sha256 (graph + external data); plan: sha256 of the file


@dataclass
class BuildInfo:
    """Build key fields besides onnx.sha256 and profile (which the entry already holds)."""

    builder: str  # "tensorrt" | "tensorrt_rtx"
    builder_version: str
    targets: list[str]  # "sm_89", ... or "rtx_default"
    options: dict = field(default_factory=dict)
    key_digest: str = ""  # sha256 of the whole build key (engines.cache.BuildKey.digest)


@dataclass
class EngineEntry:
    name: str
    runs: str  # one of RUNS
    onnx: FileRef
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    profile: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # input -> min/opt/max
    engine: FileRef | None = None  # filled by the builder
    build: BuildInfo | None = None  # filled by the builder


@dataclass
class Manifest:
    engines: list[EngineEntry]
    sampler: dict = field(default_factory=dict)  # {"timesteps": [...], "coefficients": {name: [...]}}
    caches: dict = field(default_factory=dict)  # free-form: {name: {...layout...}}
    preset: dict = field(default_factory=dict)  # free-form: {"name": "full", ...}
    pipeline: dict = field(default_factory=dict)  # {"protocol", "graphs", "stages", "images", ...} (docs/engines.md)
    schema: str = SCHEMA

    def engine(self, name: str) -> EngineEntry:
        for e in self.engines:
            if e.name == name:
                return e
        raise KeyError(f"no engine {name!r} in manifest; have {[e.name for e in self.engines]}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"schema": d.pop("schema"), **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def validate(self) -> None:
        errors = check(self.to_dict())
        if errors:
            raise ManifestError(errors)

    def save(self, path: str | Path) -> None:
        self.validate()
        cache.atomic_write(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> Manifest:
        errors = check(d)
        if errors:
            raise ManifestError(errors, where)
        return cls(engines=[_entry(e) for e in d["engines"]], sampler=d.get("sampler", {}),
                   caches=d.get("caches", {}), preset=d.get("preset", {}), pipeline=d.get("pipeline", {}),
                   schema=d["schema"])

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError([f"not valid JSON ({e}); fix the file or re-export"], str(path)) from None
        return cls.from_dict(d, str(path))


def _entry(e: dict) -> EngineEntry:
    return EngineEntry(
        name=e["name"], runs=e["runs"], onnx=FileRef(**e["onnx"]),
        inputs=[TensorSpec(**t) for t in e["inputs"]], outputs=[TensorSpec(**t) for t in e["outputs"]],
        profile=e.get("profile", {}), engine=FileRef(**e["engine"]) if e.get("engine") else None,
        build=BuildInfo(**e["build"]) if e.get("build") else None)


# ---------------------------------------------------------------- validation

def _keys(d, where: str, required: set, optional: set, errors: list) -> bool:
    if not isinstance(d, dict):
        errors.append(f"{where}: expected an object, got {type(d).__name__}")
        return False
    for k in sorted(required - set(d)):
        errors.append(f"{where}.{k}: missing; add it (see docs/engines.md)")
    for k in sorted(set(d) - required - optional):
        errors.append(f"{where}.{k}: unknown field; remove it or bump the schema")
    return not (required - set(d))


def _check_file(ref, where: str, errors: list) -> None:
    if not _keys(ref, where, {"file", "sha256"}, set(), errors):
        return
    f = ref["file"]
    if not isinstance(f, str) or not f or Path(f).is_absolute() or ".." in Path(f).parts:
        errors.append(f"{where}.file: {f!r} must be a path relative to the manifest folder, without '..'")
    if not isinstance(ref["sha256"], str) or not _SHA.match(ref["sha256"]):
        errors.append(f"{where}.sha256: expected 64 lowercase hex chars; compute it with "
                      "engines.cache.onnx_sha256 (onnx) or sha256 of the plan file")


def _check_tensors(ts, where: str, errors: list) -> None:
    if not isinstance(ts, list) or not ts:
        errors.append(f"{where}: expected a non-empty list of {{name, shape, dtype}}")
        return
    seen = set()
    for i, t in enumerate(ts):
        w = f"{where}[{i}]"
        if not _keys(t, w, {"name", "shape", "dtype"}, set(), errors):
            continue
        if not isinstance(t["name"], str) or not t["name"] or t["name"] in seen:
            errors.append(f"{w}.name: {t['name']!r} must be a non-empty string, unique in the list")
        seen.add(t["name"])
        if t["dtype"] not in DTYPES:
            errors.append(f"{w}.dtype: {t['dtype']!r} is not supported; use one of {', '.join(DTYPES)}")
        shape = t["shape"]
        if not isinstance(shape, list) or not all(
                (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                or (isinstance(d, str) and _DIM.match(d)) for d in shape):
            errors.append(f"{w}.shape: {shape!r}; use a list of ints >= 0 and dim names like \"B\" "
                          "for dynamic dims (not -1 or null)")


def _check_profile(e: dict, where: str, errors: list) -> None:
    prof = e.get("profile", {})
    if not isinstance(prof, dict):
        errors.append(f"{where}.profile: expected {{input: {{min, opt, max}}}}")
        return
    inputs = {t["name"]: t["shape"] for t in e.get("inputs", []) if isinstance(t, dict)
              and isinstance(t.get("shape"), list) and "name" in t}
    dims: dict[str, tuple] = {}
    for name, shape in inputs.items():
        dyn = [d for d in shape if isinstance(d, str)]
        if dyn and name not in prof:
            errors.append(f"{where}.profile: input {name!r} has dynamic dims {dyn} but no profile; "
                          f"add profile.{name} = {{\"min\": [...], \"opt\": [...], \"max\": [...]}}")
    for name, p in prof.items():
        w = f"{where}.profile.{name}"
        if name not in inputs:
            errors.append(f"{w}: no input named {name!r}; profile keys must be input names")
            continue
        if not _keys(p, w, {"min", "opt", "max"}, set(), errors):
            continue
        shape = inputs[name]
        for k in ("min", "opt", "max"):
            s = p[k]
            if not isinstance(s, list) or len(s) != len(shape) or not all(isinstance(d, int) and d >= 0 for d in s):
                errors.append(f"{w}.{k}: {s!r} must be {len(shape)} ints >= 0 (input shape {shape})")
                break
        else:
            for i, d in enumerate(shape):
                mn, op, mx = p["min"][i], p["opt"][i], p["max"][i]
                if isinstance(d, int) and not d == mn == op == mx:
                    errors.append(f"{w}: dim {i} is static ({d}) but the profile gives {mn}/{op}/{mx}")
                elif not mn <= op <= mx:
                    errors.append(f"{w}: dim {i} needs min <= opt <= max, got {mn}/{op}/{mx}")
                elif isinstance(d, str) and dims.setdefault(d, (mn, op, mx)) != (mn, op, mx):
                    errors.append(f"{w}: dim {d!r} is {mn}/{op}/{mx} here but {dims[d]} in another input; "
                                  "one named dim must have one range")


def _check_engine(e, where: str, errors: list) -> None:
    if not _keys(e, where, {"name", "runs", "onnx", "inputs", "outputs"},
                 {"profile", "engine", "build"}, errors):
        return
    if not isinstance(e["name"], str) or not _NAME.match(e["name"]):
        errors.append(f"{where}.name: {e['name']!r}; use letters, digits, '_', '.', '-' (a file-name-safe id)")
    if e["runs"] not in RUNS:
        errors.append(f"{where}.runs: {e['runs']!r}; use one of {', '.join(RUNS)}")
    _check_file(e["onnx"], f"{where}.onnx", errors)
    if e.get("engine") is not None:
        _check_file(e["engine"], f"{where}.engine", errors)
    _check_tensors(e["inputs"], f"{where}.inputs", errors)
    _check_tensors(e["outputs"], f"{where}.outputs", errors)
    _check_profile(e, where, errors)
    b = e.get("build")
    if b is not None and _keys(b, f"{where}.build", {"builder", "builder_version", "targets"},
                               {"options", "key_digest"}, errors):
        if b["builder"] not in BUILDERS:
            errors.append(f"{where}.build.builder: {b['builder']!r}; use one of {', '.join(BUILDERS)}")
        if not isinstance(b["targets"], list) or not all(isinstance(t, str) for t in b["targets"]):
            errors.append(f"{where}.build.targets: expected a list like [\"sm_89\"]")
    if (e.get("engine") is None) != (b is None):
        errors.append(f"{where}: 'engine' and 'build' go together; rebuild with `python -m engines build`")


def _check_sampler(s, errors: list) -> None:
    if not isinstance(s, dict):
        errors.append("sampler: expected an object")
        return
    if not s:
        return
    ts, co = s.get("timesteps"), s.get("coefficients")
    if not isinstance(ts, list) or not ts or not all(isinstance(t, int) and not isinstance(t, bool) for t in ts):
        errors.append("sampler.timesteps: expected a non-empty list of ints (one per step)")
        return
    if not isinstance(co, dict):
        errors.append("sampler.coefficients: expected {name: [one number per timestep]}")
        return
    for name, v in co.items():
        if not isinstance(v, list) or len(v) != len(ts) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            errors.append(f"sampler.coefficients.{name}: expected {len(ts)} numbers (one per timestep)")
    step = s.get("step")
    if step is not None and _keys(step, "sampler.step", {"x", "eps", "noise"}, {"rule"}, errors):
        for name in ("x", "eps", "noise"):
            v = step[name]
            if not isinstance(v, list) or len(v) != len(ts) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                errors.append(f"sampler.step.{name}: expected {len(ts)} numbers (one per timestep); re-export")


STAGE_AT = ("source", "source_step", "frame", "frame_step")
GRAPH_ROLES = ("encoder", "reference", "hint", "control", "unet", "unet_uncond", "decoder")


def _check_pipeline(p, engine_names: set, errors: list) -> None:
    """The streaming protocol block (schema 2): graph roles name engines, stages are ordered steps."""
    if p == {}:
        return
    if not _keys(p, "pipeline", {"protocol", "graphs", "stages", "images"}, {"state"}, errors):
        return
    if p["protocol"] != PROTOCOL:
        errors.append(f"pipeline.protocol: {p['protocol']!r} but this code runs {PROTOCOL!r}; re-export")
    if _keys(p["graphs"], "pipeline.graphs", set(GRAPH_ROLES), set(), errors):
        for role, name in p["graphs"].items():
            if name is not None and name not in engine_names:
                errors.append(f"pipeline.graphs.{role}: {name!r} is not in engines; export it or set null")
    if not isinstance(p["stages"], list) or not p["stages"]:
        errors.append("pipeline.stages: expected a non-empty list of stages in execution order")
        return
    for i, st in enumerate(p["stages"]):
        w = f"pipeline.stages[{i}]"
        if not _keys(st, w, {"at"}, {"graph", "op", "inputs", "outputs", "rule", "when"}, errors):
            continue
        if st["at"] not in STAGE_AT:
            errors.append(f"{w}.at: {st['at']!r}; use one of {', '.join(STAGE_AT)}")
        if ("graph" in st) == ("op" in st):
            errors.append(f"{w}: give exactly one of 'graph' (a role of pipeline.graphs) or 'op'")
        elif "graph" in st and st["graph"] not in GRAPH_ROLES:
            errors.append(f"{w}.graph: {st['graph']!r}; use one of {', '.join(GRAPH_ROLES)}")


def check(d) -> list[str]:
    """All schema problems of a manifest dict, each as 'field: problem; fix'. Empty list = valid."""
    errors: list[str] = []
    if not _keys(d, "manifest", {"schema", "engines"}, {"sampler", "caches", "preset", "pipeline"}, errors):
        return errors
    if d["schema"] != SCHEMA:
        errors.append(f"schema: {d['schema']!r} but this code reads {SCHEMA!r}; re-export with the current exporter")
    engines = d["engines"]
    if not isinstance(engines, list) or not engines:
        errors.append("engines: expected a non-empty list; export at least one component")
        engines = []
    names = [e.get("name") for e in engines if isinstance(e, dict)]
    for n in sorted({n for n in names if names.count(n) > 1}, key=str):
        errors.append(f"engines: name {n!r} used more than once; names must be unique")
    for i, e in enumerate(engines):
        _check_engine(e, f"engines[{i}]", errors)
    _check_sampler(d.get("sampler", {}), errors)
    _check_pipeline(d.get("pipeline", {}), set(names), errors)
    caches = d.get("caches", {})
    if not isinstance(caches, dict) or not all(isinstance(v, dict) for v in caches.values()):
        errors.append("caches: expected {name: {...}} with an object per cache")
    if not isinstance(d.get("preset", {}), dict):
        errors.append("preset: expected an object, e.g. {\"name\": \"full\"}")
    return errors
