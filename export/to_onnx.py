"""The one export path: torch module + ExportSpec -> cleaned fp32 ONNX -> optional fp16 ONNX.

1. `trace`: torch.onnx.export with the TorchScript-based exporter (dynamo=False), opset >= 18,
   constant folding on. torch 2.13 deprecates it, but the dynamo exporter (same graphs, same parity)
   took 8-25x longer here (tiny main UNet on 2 CPU cores: 28 s vs 740 s, most of it in onnxscript's
   optimizer) and needs onnxscript; switching is this one call.
2. `cleanup`: fold constants (shapes of static tensors included), drop Identity and dead nodes and
   unused initializers, then ONNX shape inference (on a weight-less skeleton, so it also works past
   the 2 GB protobuf limit). onnxslim was measured and left out: 17-40 s per tiny UNet graph, and
   what it adds (Gemm fusion, constant dedup) TensorRT does itself.
3. `to_fp16`: weights, activations and I/O in fp16, except fp32 islands:
     - LayerNormalization, InstanceNormalization (the exporter's GroupNorm), GroupNormalization:
       statistics of large activations; the official model runs them in fp32 (GroupNorm32, and
       autocast keeps layer_norm/group_norm in fp32);
     - the timestep embedding's phase (every node feeding Sin/Cos, the `t` input included): at
       t = 999 an fp16 phase t·f is off by up to 0.5 rad;
     - Resize scales/roi (shape-like inputs).
   Casts are inserted at island borders. Softmax stays fp16 so TensorRT can fuse attention (its
   fused kernels accumulate in fp32).
4. `save`: one external-data file `NAME.onnx.data` when the weights pass `EXTERNAL_BYTES`.

Weights stay out of core: a `Graph` is a small ModelProto whose large initializers may live in the
exporter's external-data files, and `save` streams them one tensor at a time (converting to fp16 on
the way), so post-processing a 5 GB UNet needs memory for its largest tensor, not for the model.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from export.spec import ExportOptions, ExportSpec

EXTERNAL_BYTES = 1_800_000_000  # weights beyond this go to NAME.onnx.data (protobuf caps a file at 2 GiB)
FP32_OPS = {"LayerNormalization", "InstanceNormalization", "GroupNormalization"}
PHASE_OPS = {"Sin", "Cos"}  # their whole input cone stays fp32
SHAPE_LIKE = {"Resize": (1, 2)}  # inputs that must stay fp32 whatever the precision
FP16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Graph:
    """An ONNX model whose initializers are inline or in external files under `base`."""
    model: onnx.ModelProto
    base: Path | None = None
    pending: set[str] = field(default_factory=set)  # typed fp16, still stored as fp32 externally

    @classmethod
    def load(cls, path: Path) -> "Graph":
        return cls(onnx.load(str(path), load_external_data=False), Path(path).parent)

    def array(self, t: TensorProto) -> np.ndarray:
        """The tensor's values (read from its external file if needed), in its stored dtype."""
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(TensorProto.FLOAT if t.name in self.pending else t.data_type))
        count = int(info["length"]) // dtype.itemsize if "length" in info else -1
        a = np.fromfile(self.base / info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0)))
        a = a.reshape(tuple(t.dims))
        return _half_array(a, t.name) if t.name in self.pending else a

    def inline(self, t: TensorProto) -> TensorProto:
        return t if t.data_location != TensorProto.EXTERNAL else numpy_helper.from_array(self.array(t), t.name)

    def weight_bytes(self) -> int:
        return sum(int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                   for t in self.model.graph.initializer)


# ------------------------------------------------------------------------------------ trace
def trace(module: torch.nn.Module, spec: ExportSpec, opts: ExportOptions, path: Path) -> None:
    """Export `module` at the spec's sample inputs (opt shapes) to `path` (fp32)."""
    sample = spec.sample_inputs(opts)
    args = tuple(sample[t.name] for t in spec.inputs)
    names_in, names_out = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1")  # harmless, once per strided slice
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opts.opset, input_names=names_in,
                          output_names=names_out, do_constant_folding=True,
                          dynamic_axes=spec.dynamic_axes(opts) or None)
    got = onnx.load(str(path), load_external_data=False)
    have = [i.name for i in got.graph.input]
    if have != names_in:
        raise RuntimeError(f"{spec.name}: exported inputs {have} differ from the spec {names_in}; "
                           "an input the module never reads is dropped by the exporter")


# ---------------------------------------------------------------------------------- cleanup
def cleanup(graph: Graph) -> Graph:
    """Fold constants (incl. shapes of static tensors), remove Identity and dead nodes and unused
    initializers; fill value_info by shape inference."""
    model = graph.model
    infer_shapes(model)
    fold_constants(graph)
    g = model.graph
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    keep = []
    for n in g.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
        if n.op_type == "Identity" and n.output[0] not in outputs:
            rename[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    live, nodes = set(outputs), []
    for n in reversed(keep):  # nodes are topologically sorted
        if any(o in live for o in n.output):
            nodes.append(n)
            live.update(i for i in n.input if i)
    del g.node[:]
    g.node.extend(reversed(nodes))
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)
    infer_shapes(model)
    return graph


def _static_shapes(g: onnx.GraphProto) -> dict[str, list[int]]:
    out = {}
    for v in (*g.input, *g.value_info):
        dims = v.type.tensor_type.shape.dim
        if v.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            out[v.name] = [d.dim_value for d in dims]
    return out


def fold_constants(graph: Graph) -> None:
    """Evaluate every node whose inputs are constants (Shape of a static tensor counts as one) with
    ONNX's reference evaluator, and replace it by an initializer. Torch's folding leaves the shape
    arithmetic of the exported attention (the 1/sqrt(D) scale) behind."""
    from onnx.reference import ReferenceEvaluator
    model = graph.model
    g = model.graph
    static = _static_shapes(g)
    const = {t.name for t in g.initializer}
    for k, n in enumerate(g.node):  # Shape(static x) -> Constant
        if n.op_type == "Shape" and n.input[0] in static:
            attrs = {a.name: a.i for a in n.attribute}
            dims = static[n.input[0]][attrs.get("start", 0):attrs.get("end", None)]
            g.node[k].CopyFrom(helper.make_node("Constant", [], list(n.output), name=n.name,
                                                value=numpy_helper.from_array(np.array(dims, np.int64))))
    def bloats(n) -> bool:  # an expansion whose result would be stored as a large weight
        return n.op_type in ("ConstantOfShape", "Expand", "Tile") and \
            any(np.prod(static.get(o, [0])) > 1 << 16 for o in n.output)

    fold, outs = [], set()
    for n in g.node:
        if "Random" not in n.op_type and not bloats(n) and all(not i or i in const for i in n.input):
            fold.append(n)
            const.update(n.output)
            outs.update(n.output)
    if not fold:
        return
    fold_ids = {id(n) for n in fold}
    read = {x for n in g.node if id(n) not in fold_ids for x in n.input} | {v.name for v in g.output}
    needed = [o for o in outs if o in read]
    used = {i for n in fold for i in n.input}
    sub = helper.make_model(helper.make_graph(fold, "fold", [], [onnx.ValueInfoProto(name=o) for o in needed],
                                              [graph.inline(t) for t in g.initializer if t.name in used]),
                            opset_imports=list(model.opset_import), ir_version=model.ir_version)
    values = ReferenceEvaluator(sub).run(None, {}) if needed else []
    keep = [n for n in g.node if id(n) not in fold_ids]
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(numpy_helper.from_array(np.asarray(v), o) for o, v in zip(needed, values))


def infer_shapes(model: onnx.ModelProto, strict: bool = False) -> None:
    """ONNX shape inference on a skeleton whose large weights are typed inputs (no 2 GB limit)."""
    g = model.graph
    skel = helper.make_model(helper.make_graph(list(g.node), g.name, list(g.input), list(g.output)),
                             opset_imports=list(model.opset_import), ir_version=model.ir_version)
    for t in g.initializer:
        if len(t.raw_data) > 4096 or t.data_location == TensorProto.EXTERNAL:
            skel.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            skel.graph.initializer.append(t)
    inferred = onnx.shape_inference.infer_shapes(skel, strict_mode=strict, data_prop=True)
    del g.value_info[:]
    g.value_info.extend(inferred.graph.value_info)


# ------------------------------------------------------------------------------------- fp16
def _elem_types(g: onnx.GraphProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            a = n.attribute[0]
            types[n.output[0]] = a.t.data_type if a.HasField("t") else types.get(n.output[0], 0)
    return types


def _fp32_nodes(g: onnx.GraphProto) -> set[int]:
    """Indices of nodes that run in fp32: FP32_OPS, and Sin/Cos with every node feeding them."""
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    island = {i for i, n in enumerate(g.node) if n.op_type in FP32_OPS}
    stack = [i for i, n in enumerate(g.node) if n.op_type in PHASE_OPS]
    while stack:
        i = stack.pop()
        if i in island and g.node[i].op_type not in PHASE_OPS:
            continue
        island.add(i)
        stack += [producer[x] for x in g.node[i].input if x in producer and producer[x] not in island]
    return island


def _half_array(a: np.ndarray, name: str) -> np.ndarray:
    big = np.abs(a[np.isfinite(a)]).max(initial=0.0)
    if big > FP16_MAX:
        warnings.warn(f"{name}: |value| up to {big:.3g} clipped to the fp16 range")
    return np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16)


def _half(t: TensorProto) -> TensorProto:
    return numpy_helper.from_array(_half_array(numpy_helper.to_array(t), t.name), t.name)


def to_fp16(graph: Graph) -> Graph:
    """Convert an fp32 graph (with value_info) to fp16 in place, keeping the fp32 islands above.
    External weights are only retyped here (`pending`); `save` converts their values."""
    model = graph.model
    g = model.graph
    types, island = _elem_types(g), _fp32_nodes(g)
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    consumers: dict[str, list[tuple[int, int]]] = {}
    for i, n in enumerate(g.node):
        for s, x in enumerate(n.input):
            consumers.setdefault(x, []).append((i, s))

    def wants32(i: int, s: int) -> bool:
        return i in island or s in SHAPE_LIKE.get(g.node[i].op_type, ())

    produced = {o: i for i, n in enumerate(g.node) for o in n.output}
    fp32 = {o for i in island for o in g.node[i].output}  # float tensors that stay fp32
    for x, uses in consumers.items():  # inputs/weights/constants read only by fp32 consumers stay fp32
        const = x not in produced or g.node[produced[x]].op_type == "Constant"
        if const and uses and all(wants32(i, s) for i, s in uses):
            fp32.add(x)
    is_float = lambda x: types.get(x) == F32  # noqa: E731

    for n in g.node:
        for a in n.attribute:
            if a.name == "dtype" or a.HasField("g") or len(a.graphs):
                raise NotImplementedError(f"to_fp16: {n.op_type} {n.name} has a dtype or subgraph attribute; "
                                          "add a rule for it, or avoid the op in the model")
    for i, n in enumerate(g.node):
        if i in island:
            continue
        if n.op_type == "Cast" and n.attribute[0].i == F32:
            n.attribute[0].i = F16
        elif n.op_type in ("Constant", "ConstantOfShape") and n.output[0] not in fp32:
            for a in n.attribute:
                if a.name in ("value_float", "value_floats"):
                    raise NotImplementedError(f"to_fp16: {n.name} holds a {a.name} attribute; add a rule for it")
                if a.HasField("t") and a.t.data_type == F32:
                    a.t.CopyFrom(_half(a.t))
    for k, t in enumerate(g.initializer):
        if t.data_type == F32 and t.name not in fp32:
            if t.data_location == TensorProto.EXTERNAL:
                t.data_type = F16
                graph.pending.add(t.name)
            else:
                g.initializer[k].CopyFrom(_half(t))
    for v in (*g.input, *g.output):
        if is_float(v.name) and v.name not in fp32:
            v.type.tensor_type.elem_type = F16

    casts, new_nodes = {}, []
    for i, n in enumerate(g.node):
        if n.op_type in ("Cast", "Shape"):  # any input type is fine
            continue
        for s, x in enumerate(n.input):
            if not x or not is_float(x):
                continue
            want = F32 if wants32(i, s) else F16
            have = F32 if x in fp32 else F16
            if want != have:
                key = (x, want)
                if key not in casts:
                    casts[key] = f"{x}/to_{'fp32' if want == F32 else 'fp16'}"
                    new_nodes.append((i, helper.make_node("Cast", [x], [casts[key]], to=want, name=casts[key])))
                n.input[s] = casts[key]
    for i, node in reversed(new_nodes):  # insert each Cast right before its first consumer
        g.node.insert(i, node)
    infer_shapes(model, strict=True)
    return graph


# ------------------------------------------------------------------------------------- save
def save(graph: Graph, path: Path, external_bytes: int = EXTERNAL_BYTES) -> list[Path]:
    """Write `path` (and `path`.data, streamed tensor by tensor, when the weights exceed
    `external_bytes`). `graph` is left unchanged. Returns the files written.

    Both files are written to temp files and renamed into place only once both are complete
    (models.fileio), so an interrupted export leaves the previous graph and its data untouched.
    """
    from models.fileio import atomic_output
    data = path.with_name(path.name + ".data")
    out = onnx.ModelProto()
    out.CopyFrom(graph.model)  # small: large weights are external (or the whole model is small)
    external = graph.weight_bytes() > external_bytes
    with atomic_output(path) as tmp_model:
        with atomic_output(data) if external else contextlib.nullcontext() as tmp_data:
            with open(tmp_data, "wb") if external else contextlib.nullcontext() as f:
                for t in out.graph.initializer:
                    if t.data_location != TensorProto.EXTERNAL and not external:
                        continue
                    a = graph.array(t)
                    if not external or a.nbytes < 1024:
                        t.CopyFrom(numpy_helper.from_array(a, t.name))
                        continue
                    f.write(b"\0" * (-f.tell() % 4096))  # page-aligned, so loaders can mmap each tensor
                    offset = f.tell()
                    f.write(np.ascontiguousarray(a).tobytes())
                    t.ClearField("raw_data")
                    t.data_location = TensorProto.EXTERNAL
                    del t.external_data[:]
                    for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(a.nbytes))):
                        t.external_data.add(key=k, value=v)
            onnx.save_model(out, str(tmp_model))
        # the data file (if any) is in place now; the graph that refers to it is renamed last
    if not external:
        data.unlink(missing_ok=True)  # a stale external-data file of an earlier, larger export
    return [path, data] if external else [path]


def _size(files: list[Path]) -> str:
    return f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB"


def export_graph(module: torch.nn.Module, spec: ExportSpec, opts: ExportOptions, out: dict[str, Path],
                 log: Callable[[str], None] = print, external_bytes: int = EXTERNAL_BYTES,
                 after_trace: Callable[[], None] | None = None) -> dict[str, list[Path]]:
    """Export one graph: out = {"fp32": path, "fp16": path} (either or both). `after_trace` runs once the
    torch module is no longer needed (to free its weights). Returns the files per precision."""
    t0 = time.perf_counter()
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    files = {}
    with tempfile.TemporaryDirectory(prefix=f".export-{spec.name}-", dir=next(iter(out.values())).parent) as tmp:
        raw = Path(tmp) / f"{spec.name}.onnx"
        trace(module, spec, opts, raw)
        del module
        if after_trace is not None:
            after_trace()
        t1 = time.perf_counter()
        graph = cleanup(Graph.load(raw))
        log(f"  traced in {t1 - t0:.1f} s, cleaned in {time.perf_counter() - t1:.1f} s: {len(graph.model.graph.node)} "
            f"nodes, {graph.weight_bytes() / 2**20:.1f} MiB of fp32 weights")
        if "fp32" in out:
            files["fp32"] = save(graph, out["fp32"], external_bytes)
            log(f"  fp32 -> {out['fp32']} ({_size(files['fp32'])})")
        if "fp16" in out:
            t2 = time.perf_counter()
            if spec.fp16:
                to_fp16(graph)
            files["fp16"] = save(graph, out["fp16"], external_bytes)
            what = "fp16" if spec.fp16 else "fp32 (kept: see the spec's doc)"
            log(f"  {what} -> {out['fp16']} ({_size(files['fp16'])}) in {time.perf_counter() - t2:.1f} s")
    return files
