"""What is inside a plan: I/O tensors and layers with their precisions.

Sources, best first; `inspect()` says which one it used:
1. the TensorRT engine inspector on the deserialized plan (fused layers, tactics, formats);
   deserializing needs a CUDA GPU the plan can run on;
2. the sidecar `X.plan.json` written at build time, which holds
   - `engine_layers`: the inspector's view if the build machine had such a GPU, else (TensorRT-RTX)
     the compiled layers parsed from the builder's "Layers:" log report (no GPU needed);
   - `network_layers`: the network as parsed from ONNX (pre-fusion), each layer with its output
     dtypes; in a strongly typed network these are the precisions TensorRT must honour.
"""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

from engines import cache, trt_import

NO_GPU_NOTE = "no CUDA GPU here: the plan cannot be deserialized, so the engine inspector did not run"
LOG_SOURCE = "sidecar (compiled layers from the TensorRT-RTX build log; no GPU needed)"
_LOG_DTYPES = {"Float": "float32", "Half": "float16", "BFloat16": "bfloat16", "BF16": "bfloat16",
               "Int8": "int8", "Int32": "int32", "Int64": "int64", "Bool": "bool", "UInt8": "uint8",
               "FP8": "float8_e4m3fn"}


def _cuda_available() -> bool:
    """A CUDA device is visible to the driver API (checked via libcuda, without importing torch)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


# ---------------------------------------------------------------- build-time info (no GPU needed)

def network_io(network, profile: dict) -> list[dict]:
    io = []
    for mode, n, get in (("input", network.num_inputs, network.get_input),
                         ("output", network.num_outputs, network.get_output)):
        for i in range(n):
            t = get(i)
            io.append({"name": t.name, "mode": mode, "dtype": trt_import.dtype_name(t.dtype),
                       "shape": list(t.shape), "profile": profile.get(t.name)})
    return io


def network_layers(network) -> list[dict]:
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        layers.append({"name": layer.name, "type": layer.type.name,
                       "dtypes": [trt_import.dtype_name(t.dtype) for t in outs]})
    return layers


def parse_layer_report(text: str | None) -> list[dict] | None:
    """Layers from the builder's "Layers:" log report (one "Name: .., LayerType: .., ..." line each)."""
    if not text:
        return None
    layers = []
    for line in text.split("\n"):
        m = re.match(r"Name: (.*?), LayerType: (.*?), Inputs: .*?Outputs: \[(.*?)\], TacticName: (.*?), ", line)
        if m:
            dtypes = re.findall(r"Datatype: (\w+)", m.group(3))
            layers.append({"name": m.group(1), "type": m.group(2),
                           "dtypes": [_LOG_DTYPES.get(d, d.lower()) for d in dtypes], "tactic": m.group(4)})
    return layers or None


# ---------------------------------------------------------------- engine inspector (GPU)

def _deserialize(fl, plan):
    runtime = fl.trt.Runtime(fl.logger)
    return runtime.deserialize_cuda_engine(plan)


def _engine_io(fl, engine) -> list[dict]:
    trt, io = fl.trt, []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        shape = list(engine.get_tensor_shape(name))
        prof = None
        if mode == "input" and -1 in shape:
            prof = dict(zip(("min", "opt", "max"), (list(s) for s in engine.get_tensor_profile_shape(name, 0))))
        io.append({"name": name, "mode": mode, "dtype": trt_import.dtype_name(engine.get_tensor_dtype(name)),
                   "shape": shape, "profile": prof})
    return io


def _engine_layers(fl, engine) -> list[dict]:
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(fl.trt.LayerInformationFormat.JSON))
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # built without detailed profiling: names only
            layers.append({"name": layer, "type": "?", "dtypes": []})
            continue
        outs = layer.get("Outputs", [])
        layers.append({"name": layer.get("Name", "?"), "type": layer.get("LayerType", "?"),
                       "dtypes": [o.get("Format/Datatype", "?") for o in outs],
                       "tactic": layer.get("TacticName")})
    return layers


def engine_info(fl, plan) -> tuple[dict | None, str]:
    """({"io", "layers"}, note) from the engine inspector, or (None, why not)."""
    if not _cuda_available():
        return None, NO_GPU_NOTE
    engine = _deserialize(fl, plan)
    if engine is None:
        return None, (f"{fl.name} could not deserialize the plan on this GPU (an RTX plan on a non-RTX "
                      "GPU such as Hopper, or a plan from another TensorRT version)")
    return {"io": _engine_io(fl, engine), "layers": _engine_layers(fl, engine)}, "engine inspector"


# ---------------------------------------------------------------- report

def inspect(engine_path: str | Path, flavour: str | None = None) -> dict:
    """Describe a plan; prefers the live engine inspector, falls back to the sidecar."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise FileNotFoundError(f"{engine_path}: no such engine; build it with `python -m engines build`")
    side = cache.read_sidecar(engine_path) or {}
    key = side.get("key") or {}
    report = {"engine": str(engine_path), "bytes": engine_path.stat().st_size, "key": key or None,
              "io": side.get("io", []), "layers": side.get("network_layers", []),
              "source": "sidecar (network layers parsed from ONNX, pre-fusion)", "note": ""}
    if side and side.get("engine_sha256") != cache.sha256_file(engine_path):
        report["note"] = "WARNING: plan hash differs from the sidecar (corrupt or rebuilt elsewhere). "
    try:
        fl = trt_import.load(flavour or key.get("builder") or "auto")
    except trt_import.TrtUnavailable as e:
        live, why = None, str(e)
    else:
        live, why = engine_info(fl, engine_path.read_bytes())
    if live is not None:
        report.update(io=live["io"], layers=live["layers"], source=f"{fl.name} engine inspector")
        return report
    if not side:
        raise FileNotFoundError(f"{engine_path}: {why}, and there is no sidecar "
                                f"{cache.sidecar_path(engine_path).name} to fall back on; rebuild with "
                                "`python -m engines build` to get one")
    if side.get("engine_layers"):
        report.update(layers=side["engine_layers"], source=side.get("engine_layers_source", "sidecar"))
    report["note"] += why
    return report


def _shape(s) -> str:
    return "(" + ", ".join(str(d) for d in s) + ")"


def format_report(r: dict) -> str:
    lines = [f"engine  {r['engine']}  ({r['bytes']:,} bytes)"]
    if r["key"]:
        k = r["key"]
        lines.append(f"built   {k['builder']} {k['builder_version']}  targets {','.join(k['targets'])}  "
                     f"onnx {k['onnx_sha256'][:12]}  options {k['options']}")
    lines.append("I/O")
    for t in r["io"]:
        prof = t.get("profile")
        p = f"  min {_shape(prof['min'])} opt {_shape(prof['opt'])} max {_shape(prof['max'])}" if prof else ""
        lines.append(f"  {t['mode']:<6} {t['name']:<24} {t['dtype']:<9} {_shape(t['shape'])}{p}")
    counts: dict[str, int] = {}
    for layer in r["layers"]:
        for d in set(layer["dtypes"]) or {"?"}:
            counts[d] = counts.get(d, 0) + 1
    lines.append(f"layers  {len(r['layers'])} from {r['source']}; by output dtype: {counts}")
    for layer in r["layers"]:
        lines.append(f"  {layer['type']:<16} {','.join(layer['dtypes']) or '-':<24} {layer['name']}")
    if r["note"]:
        lines.append(f"note    {r['note']}")
    return "\n".join(lines)
