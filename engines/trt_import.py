"""Pick the TensorRT flavour: full `tensorrt` or `tensorrt_rtx`, behind one code path.

Both packages expose the same Python API for what we use (OnnxParser, strongly typed networks,
optimization profiles, Runtime, EngineInspector). The differences are few and are named here as
capabilities, so build.py / engine.py never test the package name:

- target:       full TensorRT builds for the GPU it runs on (needs one); TensorRT-RTX builds ahead
                of time on a CPU-only machine for a list of compute capabilities (RTX GPUs only:
                SM 7.5/8.0/8.6/8.9/12.x, not Hopper).
- timing cache: full TensorRT only. In TensorRT-RTX the timing-cache calls are deprecated no-ops
                (1.2+); RTX JIT-compiles kernels at load time and caches them in a *runtime* cache.

Nothing is imported until `load()` is called (no work at import time).
"""

from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType

FLAVOURS = ("tensorrt", "tensorrt_rtx")


class TrtUnavailable(ImportError):
    """Neither TensorRT flavour can be imported (or the requested one cannot)."""


@dataclass(frozen=True)
class Flavour:
    name: str  # "tensorrt" | "tensorrt_rtx"
    trt: ModuleType  # the imported package
    version: str
    logger: object  # one logger per process and flavour: TensorRT ignores any later, different one

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    @property
    def has_timing_cache(self) -> bool:
        return not self.is_rtx

    @property
    def has_runtime_cache(self) -> bool:
        return hasattr(self.trt, "IRuntimeCache") and self.is_rtx

    @property
    def builds_without_gpu(self) -> bool:
        return self.is_rtx


def _import(name: str) -> ModuleType:
    mod = importlib.import_module(name)
    # PyPI's `tensorrt` placeholder packages fail at install time, but a half-installed one can
    # leave an importable shell behind: insist on the real API.
    if not hasattr(mod, "Builder"):
        raise ImportError(f"{name} is importable but has no Builder (placeholder package?)")
    return mod


@functools.cache
def _flavour(name: str) -> Flavour:
    """One Flavour (and so one logger) per package per process, however it was asked for."""
    trt = _import(name)
    return Flavour(name, trt, trt.__version__, _logger(trt, name))


def load(prefer: str = "auto") -> Flavour:
    """Import and return a flavour. prefer: "auto" (tensorrt, else tensorrt_rtx) or a name in FLAVOURS."""
    if prefer not in ("auto", *FLAVOURS):
        raise ValueError(f"unknown TensorRT flavour {prefer!r}; use 'auto', 'tensorrt' or 'tensorrt_rtx'")
    names = FLAVOURS if prefer == "auto" else (prefer,)
    errors = []
    for name in names:
        try:
            return _flavour(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    hint = "pip install tensorrt-rtx-cu13  (builds on CPU; runs on RTX GPUs)  or  pip install tensorrt-cu13"
    raise TrtUnavailable(f"no usable TensorRT ({'; '.join(errors)}). Fix: {hint}")


def _logger(trt: ModuleType, name: str):
    """A trt.ILogger that prints like trt.Logger and keeps the builder's last layer report.

    With ProfilingVerbosity.DETAILED, TensorRT-RTX logs the compiled engine's layers (fused, with
    datatypes) as one VERBOSE message starting "Layers:" at the end of a build. TensorRT sends every
    message to the logger whatever its level, so keeping that report costs nothing, and it is the
    only view of the built engine on a machine without a GPU.
    """

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.min_severity = trt.ILogger.Severity.WARNING
            self.layer_report: str | None = None

        def log(self, severity, msg):
            if msg.startswith("Layers:"):
                self.layer_report = msg
            if severity <= self.min_severity:
                print(f"[{name}] [{severity.name}] {msg}", file=sys.stderr)

    return Logger()


def set_verbose(fl: Flavour, verbose: bool) -> None:
    """Builder/runtime log level; the logger is shared, so this applies process-wide."""
    sev = fl.trt.ILogger.Severity
    fl.logger.min_severity = sev.VERBOSE if verbose else sev.WARNING


# TensorRT DataType member name -> the dtype names used in manifests and sidecars (torch spelling).
DTYPE_NAMES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
    "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8_e4m3fn", "INT4": "int4",
    "FP4": "float4_e2m1", "E8M0": "float8_e8m0fnu",
}


def dtype_name(trt_dtype) -> str:
    return DTYPE_NAMES.get(trt_dtype.name, trt_dtype.name.lower())


def available(prefer: str = "auto") -> str | None:
    """The flavour name `load(prefer)` would return, or None; for tests and CLI messages."""
    try:
        return load(prefer).name
    except TrtUnavailable:
        return None
