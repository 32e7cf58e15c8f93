"""Engine cache: content hashes, the build key, the sidecar JSON, atomic writes.

An engine `X.plan` is valid only together with its sidecar `X.plan.json`, which records
- the build key: ONNX content hash (graph file + every external-data file it references),
  builder name and version, compute-capability targets, optimization profile, build options;
- the sha256 and size of the plan, so a truncated or overwritten plan is detected without a GPU;
- build-time info for `python -m engines inspect` (I/O and network layers with dtypes).

A plan is reused only when the stored key equals the wanted key and the plan's hash matches.
Everything is written atomically (temp file in the same folder + os.replace), plan first and
sidecar last, so a crash leaves either the old pair, or a pair whose hashes disagree (-> rebuild).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SIDECAR_SUFFIX = ".json"
_CHUNK = 1 << 24  # 16 MiB reads when hashing multi-GB weights


class EngineCacheError(RuntimeError):
    """A cached engine is missing, stale or corrupt and rebuilding is not allowed."""


# ---------------------------------------------------------------- hashing

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tensors(graph):
    """Every TensorProto in a graph, subgraphs (If/Loop bodies) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def external_data_files(onnx_path: Path) -> list[Path]:
    """The external-data files an ONNX model references, sorted, without loading the weights."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except OSError:
        raise
    except Exception as e:  # protobuf DecodeError and friends: not an ONNX file, or a truncated one
        raise ValueError(f"{onnx_path}: not a readable ONNX model ({type(e).__name__}: {e}); "
                         "re-export it with `python -m export`") from None
    locations = set()
    for t in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in t.external_data if e.key == "location")
    files = sorted(onnx_path.parent / loc for loc in locations)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{onnx_path}: external data file(s) missing: {missing}; "
                                "copy them next to the .onnx file or re-export")
    return files


def onnx_sha256(onnx_path: str | Path) -> str:
    """Content hash of an ONNX model: the graph file plus its external-data files (by relative name)."""
    onnx_path = Path(onnx_path)
    h = hashlib.sha256()
    h.update(bytes.fromhex(sha256_file(onnx_path)))
    for f in external_data_files(onnx_path):
        h.update(f.relative_to(onnx_path.parent).as_posix().encode() + b"\0")
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


# ---------------------------------------------------------------- build key

@dataclass
class BuildKey:
    onnx_sha256: str
    builder: str  # "tensorrt" | "tensorrt_rtx"
    builder_version: str
    targets: list[str]  # ["sm_89", ...]; ["rtx_default"] = RTX's portable default set
    profile: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # input -> min/opt/max
    options: dict = field(default_factory=dict)  # opt level, workspace, ... (anything that changes the plan)

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def diff(self, other: dict) -> list[str]:
        """Field names whose values differ from `other` (a stored key dict)."""
        mine = self.to_dict()
        return sorted(k for k in set(mine) | set(other) if mine.get(k) != other.get(k))


# ---------------------------------------------------------------- sidecar + lookup

def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)


def read_sidecar(engine_path: Path) -> dict | None:
    try:
        return json.loads(sidecar_path(engine_path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def check(engine_path: Path, key: BuildKey) -> str | None:
    """None when the cached plan matches `key` and is intact, else the reason it cannot be used."""
    if not engine_path.is_file():
        return "no engine file"
    side = read_sidecar(engine_path)
    if side is None or not isinstance(side.get("key"), dict):
        return f"sidecar {sidecar_path(engine_path).name} missing or unreadable"
    changed = key.diff(side["key"])
    if changed:
        return f"stale: build key changed in {changed}"
    size = engine_path.stat().st_size
    if size != side.get("engine_bytes") or sha256_file(engine_path) != side.get("engine_sha256"):
        return f"corrupt: plan size/sha256 differ from the sidecar ({size} bytes on disk)"
    return None


# ---------------------------------------------------------------- atomic writes

def atomic_write(path: Path, data) -> None:
    """Write bytes/str/buffer to `path` via a temp file in the same folder and os.replace
    (the one helper every command uses: models.fileio.atomic_write)."""
    from models.fileio import atomic_write as write

    write(path, data)


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")
