"""Run a TensorRT plan on torch CUDA tensors (GPU only; same code for tensorrt and tensorrt_rtx).

    eng = Engine("artifacts/engines/denoiser.plan")      # checks sidecar, deserializes
    eng.activate()                                        # or activate(shared_scratch) for shared memory
    out = eng.infer({"sample": x, "t": t}, stream)        # dict of output tensors (static buffers)

- I/O are bound by name with set_tensor_address where the tensors already are (persistent buffers
  such as the temporal ring caches are never copied); execution is execute_async_v3 on a torch
  stream; nothing syncs with the host.
- One execution context per CUDA stream, so concurrent streams (sessions) never share bindings.
- Outputs go into caller-provided buffers (`out=`) or into buffers owned by the stream's context,
  overwritten by its next call: clone what you keep.
- Shapes may change between calls inside the profile; outputs are reallocated on a change.
- use_cuda_graph=True replays a CUDA graph per distinct set of bound addresses (full TensorRT:
  torch.cuda.CUDAGraph capture; TensorRT-RTX: its built-in whole-graph capture strategy).
- Engines that run one after another on one stream can share scratch memory: shared_scratch().

Ideas from NVIDIA/TensorRT demo/Diffusion engine.py (USER_MANAGED memory, graph capture); written
from scratch for torch tensors and both TensorRT flavours.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from engines import cache, trt_import

log = logging.getLogger(__name__)

TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
    "int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "uint8": torch.uint8,
    "float8_e4m3fn": torch.float8_e4m3fn,
}


class EngineError(RuntimeError):
    """A plan cannot be loaded or run; the message names the fix."""


def _current_sm() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def _check_sidecar(path: Path, plan: bytes, fl) -> None:
    """Refuse plans that are corrupt or built by another builder/version/GPU, before TensorRT sees them."""
    side = cache.read_sidecar(path)
    fix = f"rebuild: python -m engines build (or delete {path.name})"
    if side is None:
        log.warning("%s: no sidecar; cannot check builder/version/targets before deserializing", path.name)
        return
    if hashlib.sha256(plan).hexdigest() != side.get("engine_sha256"):
        raise EngineError(f"{path}: plan does not match its sidecar hash (truncated or overwritten); {fix}")
    key = side["key"]
    if (key["builder"], key["builder_version"]) != (fl.name, fl.version):
        raise EngineError(f"{path}: built by {key['builder']} {key['builder_version']}, loading with "
                          f"{fl.name} {fl.version}; {fix}, or load with the matching flavour")
    sm, targets = _current_sm(), key["targets"]
    if targets != ["rtx_default"] and sm not in targets:
        raise EngineError(f"{path}: built for {targets}, this GPU is {sm}; {fix}"
                          + (" (Hopper is not an RTX target: use full tensorrt)" if sm.startswith("sm_9") else ""))


class Engine:
    def __init__(self, path: str | Path, flavour: str | None = None, use_cuda_graph: bool = False,
                 runtime_cache: str | Path | None = None):
        if not torch.cuda.is_available():
            raise EngineError("Engine needs a CUDA GPU; on CPU use runtime.backends.OrtBackend or TorchBackend")
        self.path = Path(path)
        if not self.path.is_file():
            raise EngineError(f"{self.path}: no such plan; build it with `python -m engines build`")
        side_key = (cache.read_sidecar(self.path) or {}).get("key") or {}
        self.fl = trt_import.load(flavour or side_key.get("builder") or "auto")
        self.use_cuda_graph = use_cuda_graph
        self.runtime_cache_path = Path(runtime_cache) if runtime_cache else None
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.engine = self._deserialize()
        trt, e = self.fl.trt, self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        self.input_names = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: TORCH_DTYPES[trt_import.dtype_name(e.get_tensor_dtype(n))] for n in names}
        self.context = None
        self._runtime_cache = None
        self._contexts: dict[int, _Context] = {}  # per CUDA stream (cuda_stream handle)

    def _deserialize(self):
        plan = self.path.read_bytes()
        _check_sidecar(self.path, plan, self.fl)
        runtime = self._runtime = self.fl.trt.Runtime(self.fl.logger)  # keep it alive as long as the engine
        if hasattr(runtime, "get_engine_validity"):  # TensorRT-RTX: says *why* a plan cannot load
            validity, diagnostics = runtime.get_engine_validity(plan[: runtime.engine_header_size])
            if validity == self.fl.trt.EngineValidity.INVALID:
                flags = self.fl.trt.EngineInvalidityDiagnostics.__members__.items()
                why = [k for k, v in flags if diagnostics & int(v)]
                raise EngineError(f"{self.path}: {self.fl.name} rejects the plan ({', '.join(why) or diagnostics}); "
                                  "rebuild it with `python -m engines build` for this GPU/driver")
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineError(f"{self.path}: {self.fl.name} {self.fl.version} could not deserialize the plan "
                              "(corrupt, other TensorRT version, or other GPU); rebuild with "
                              "`python -m engines build --rebuild always`")
        return engine

    @property
    def device_memory_size(self) -> int:
        return self.engine.device_memory_size_v2

    def activate(self, scratch: torch.Tensor | None = None) -> None:
        """Create the execution context; with `scratch`, use that (shared) buffer as its device memory."""
        trt, strategy = self.fl.trt, self.fl.trt.ExecutionContextAllocationStrategy
        alloc = strategy.USER_MANAGED if scratch is not None else strategy.STATIC
        if self.fl.is_rtx:
            config = self.engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(alloc)
            if self.use_cuda_graph:
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            if self.runtime_cache_path is not None:
                self._runtime_cache = self._load_runtime_cache(config)
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context(alloc)
        if self.context is None:
            raise EngineError(f"{self.path}: could not create an execution context (out of GPU memory?)")
        if scratch is not None:
            need = self.device_memory_size
            have = scratch.numel() * scratch.element_size()
            if have < need or scratch.data_ptr() % 256 or scratch.device != self.device:
                raise EngineError(f"scratch must be a 256-byte aligned buffer of >= {need} bytes on {self.device}")
            self.context.set_device_memory(scratch.data_ptr(), need)
        self._contexts = {}

    def _load_runtime_cache(self, config):
        rc = config.create_runtime_cache()
        p = self.runtime_cache_path
        if p.is_file() and not rc.deserialize(p.read_bytes()):
            log.warning("%s: runtime cache from another GPU/driver/version; starting a new one", p)
        config.set_runtime_cache(rc)
        return rc

    def save_runtime_cache(self) -> None:
        """TensorRT-RTX: persist JIT-compiled kernels so the next start skips compilation."""
        if self._runtime_cache is not None:
            cache.atomic_write(self.runtime_cache_path, self._runtime_cache.serialize())

    # ------------------------------------------------------------ shapes and buffers

    def _profile(self, name: str) -> str:
        mn, op, mx = self.engine.get_tensor_profile_shape(name, 0)
        return f"min {tuple(mn)} opt {tuple(op)} max {tuple(mx)}"

    def _set_shapes(self, ctx: "_Context", shapes: dict[str, tuple]) -> None:
        for name, shape in shapes.items():
            if not ctx.trt.set_input_shape(name, shape):
                raise EngineError(f"input {name!r}: shape {shape} is outside the engine profile "
                                  f"({self._profile(name)}); rebuild with a wider profile")
        ctx.outputs = {}
        for name in self.output_names:
            shape = tuple(ctx.trt.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"output {name!r} has data-dependent shape {shape}; not supported")
            ctx.outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
        ctx.shapes, ctx.graphs = shapes, {}

    def _check_feed(self, feed: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in self.input_names if n not in feed]
        extra = [n for n in feed if n not in self.input_names]
        if missing or extra:
            raise EngineError(f"feed names: missing {missing}, unexpected {extra}; inputs are {self.input_names}")
        for n in self.input_names:
            t = feed[n]
            if t.dtype != self.dtypes[n] or t.device != self.device:
                raise EngineError(f"input {n!r}: got {t.dtype} on {t.device}, engine wants "
                                  f"{self.dtypes[n]} on {self.device}")

    # ------------------------------------------------------------ execution

    def _enqueue(self, ctx: "_Context", stream: torch.cuda.Stream) -> None:
        if not ctx.trt.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"{self.path.name}: execute_async_v3 failed (see the TensorRT log above)")

    def _context_for(self, stream: torch.cuda.Stream) -> "_Context":
        """One execution context per CUDA stream: concurrent streams never share bindings or scratch."""
        if self.context is None:
            self.activate()
        key = stream.cuda_stream
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = _Context(self.context if not self._contexts else self._new_trt_context())
            self._contexts[key] = ctx
        return ctx

    def _new_trt_context(self):
        ctx = self.engine.create_execution_context()
        if ctx is None:
            raise EngineError(f"{self.path}: could not create another execution context (out of GPU memory?)")
        return ctx

    def infer(self, feed: Mapping[str, torch.Tensor], stream: torch.cuda.Stream | None = None,
              out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run on `stream` (default: current) with that stream's own execution context.

        Inputs are bound where they are (no copies: persistent buffers such as ring caches stay put);
        outputs go into `out` when given (caller-owned buffers, bound by name), else into the
        context's own buffers, overwritten by its next call. Ready on `stream`; nothing syncs the host.
        With use_cuda_graph, one graph is captured per distinct set of bound addresses and replayed.
        """
        self._check_feed(feed)
        current = torch.cuda.current_stream(self.device)
        stream = stream or current
        ctx = self._context_for(stream)
        inputs = {n: t if t.is_contiguous() else t.contiguous() for n, t in feed.items()}
        if stream != current:  # inputs come from `current`: order after them without a host sync,
            stream.wait_stream(current)  # and keep their memory alive until `stream` has read them
            for t in inputs.values():
                t.record_stream(stream)
        with torch.cuda.stream(stream):
            shapes = {n: tuple(inputs[n].shape) for n in self.input_names}
            if shapes != ctx.shapes:
                self._set_shapes(ctx, shapes)  # buffers allocated on `stream`
            outputs = dict(ctx.outputs)
            if out is not None:
                for n, t in out.items():
                    if n not in outputs or tuple(t.shape) != tuple(outputs[n].shape) or t.dtype != self.dtypes[n]:
                        raise EngineError(f"out[{n!r}] must be {self.dtypes[n]} {tuple(outputs[n].shape)}")
                    outputs[n] = t
            bound = {**inputs, **outputs}
            key = tuple((n, t.data_ptr()) for n, t in bound.items())
            if key != ctx.bound:
                for n, t in bound.items():
                    ctx.trt.set_tensor_address(n, t.data_ptr())
                ctx.bound = key
            if not self.use_cuda_graph or self.fl.is_rtx:  # RTX captures and replays graphs itself
                self._enqueue(ctx, stream)
            else:
                self._replay(ctx, key, stream)
        return outputs

    def _replay(self, ctx: "_Context", key: tuple, stream: torch.cuda.Stream) -> None:
        graph = ctx.graphs.get(key)
        if graph is None:
            self._enqueue(ctx, stream)  # first run outside capture: TensorRT does lazy setup on it
            # capture on a side stream: the legacy default stream cannot be captured
            side = torch.cuda.Stream(self.device)
            side.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                self._enqueue(ctx, side)
            stream.wait_stream(side)
            ctx.graphs[key] = graph
            return
        graph.replay()


class _Context:
    """An execution context with its bindings, output buffers and captured graphs (one per stream)."""

    def __init__(self, trt_context):
        self.trt = trt_context
        self.shapes: dict[str, tuple] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.bound: tuple = ()
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}


def shared_scratch(engines: Sequence[Engine]) -> torch.Tensor:
    """One scratch buffer for engines that never run concurrently; activates each engine on it."""
    size = max(e.device_memory_size for e in engines)
    scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=engines[0].device)
    for e in engines:
        e.activate(scratch)
    return scratch
