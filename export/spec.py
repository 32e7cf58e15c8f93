"""ExportSpec: everything the one exporter needs to know about one graph (style rule 4).

A spec names the graph's inputs and outputs in order, gives their shapes as dim expressions over a
few named dims, says how often the graph runs, which dims `--dynamic` frees, how to draw sample
inputs, and how to build the torch module (a wrapper from export/wrappers.py with flat, named tensor
I/O). export/specs.py holds one short entry per graph; export/to_onnx.py is the only exporter.

Dim expressions: an int, a dim name, or names and ints joined by '*' and '/' and evaluated left to
right with integer division: "B", "8*h", "h/4", "B*h*w/16". Dims:
  B  frames per call of the per-frame graphs (= streams for unet_stream); T  frames of the full-window
  unet (one temporal window); h, w  latent height/width (images are 8h x 8w); L  ring slots of the
  temporal caches. Static exports replace every expression by its value; dynamic ones keep the
  expression as the ONNX dim name and get min/opt/max profiles from `ExportOptions.ranges()`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

RUNS = ("per_source", "per_source_step", "per_frame", "per_frame_step")
Dim = int | str


def eval_dim(expr: Dim, dims: dict[str, int]) -> int:
    """Value of a dim expression ("B*h*w/16") for concrete dims."""
    if isinstance(expr, int):
        return expr
    tokens = re.split(r"([*/])", expr)
    value, op = None, "*"
    for tok in tokens:
        if tok in "*/" and tok:
            op = tok
            continue
        try:
            v = int(tok) if tok.isdigit() else dims[tok]
        except KeyError:
            raise KeyError(f"dim expression {expr!r} uses {tok!r}; known dims: {sorted(dims)}") from None
        if value is None:
            value = v
        elif op == "*":
            value *= v
        else:
            value //= v
    return value


def dim_names(expr: Dim) -> set[str]:
    return set() if isinstance(expr, int) else {t for t in re.split(r"[*/]", expr) if not t.isdigit()}


@dataclass(frozen=True)
class ExportOptions:
    """Shapes the graphs are exported for (static), or the opt point of their profiles (--dynamic)."""
    latent_hw: tuple[int, int] = (64, 64)
    batch: int = 1       # B
    window: int = 16     # T
    slots: int = 16      # L: 15 past frames + the slot being written (kernels/motion_attention.py)
    dynamic: bool = False
    max_batch: int = 4   # profile max of B with --dynamic
    opset: int = 18

    def __post_init__(self):
        h, w = self.latent_hw
        if h % 8 or w % 8:
            raise ValueError(f"latent size {h}x{w} must be a multiple of 8 (the UNet halves it 3 times); "
                             f"images are 8x larger ({8 * h}x{8 * w})")
        if not 2 <= self.slots <= 24:
            raise ValueError(f"ring slots L={self.slots} must be in [2, 24] (the positional table has 24 rows)")

    def dims(self) -> dict[str, int]:
        h, w = self.latent_hw
        return {"B": self.batch, "T": self.window, "h": h, "w": w, "L": self.slots}

    def ranges(self) -> dict[str, tuple[int, int, int]]:
        """min/opt/max per dim for --dynamic: batch 1..max_batch, resolution from 1/2 to 3/2 (multiples of 8)."""
        def res(n: int) -> tuple[int, int, int]:
            return max(8, n // 2 // 8 * 8), n, max(n, (3 * n // 2) // 8 * 8)
        h, w = self.latent_hw
        return {"B": (1, self.batch, max(self.batch, self.max_batch)), "h": res(h), "w": res(w)}


def normal(shape: tuple[int, ...], g: torch.Generator, dims: dict[str, int]) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def timestep(shape: tuple[int, ...], g: torch.Generator, dims: dict[str, int]) -> torch.Tensor:
    """DDPM timesteps as float32 (the graphs take t as float: TensorRT has no int64 math)."""
    return torch.randint(1, 1000, shape, generator=g).float()


@dataclass(frozen=True)
class TensorDesc:
    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float"  # "float": the graph's precision; "float32": always fp32; "int32"
    sample: Callable[[tuple[int, ...], torch.Generator, dict[str, int]], torch.Tensor] = normal


@dataclass(frozen=True)
class ExportSpec:
    name: str
    runs: str  # one of RUNS
    build: Callable  # (ModelSource, ExportOptions) -> nn.Module; forward(*inputs) -> tuple(outputs)
    inputs: tuple[TensorDesc, ...]
    outputs: tuple[TensorDesc, ...]
    dynamic: tuple[str, ...] = ("B", "h", "w")  # dims that --dynamic frees
    fp16: bool = True  # False: the graph stays fp32 in the fp16 set (see `doc`)
    needs: tuple[str, ...] = ()  # ModelSource parts the module uses (to free memory after the last user)
    doc: str = ""  # one line: what it computes and what is cached

    def __post_init__(self):
        if self.runs not in RUNS:
            raise ValueError(f"{self.name}: runs={self.runs!r}; use one of {RUNS}")

    def _free(self, opts: ExportOptions) -> set[str]:
        return set(self.dynamic) if opts.dynamic else set()

    def shape(self, t: TensorDesc, opts: ExportOptions) -> tuple[int, ...]:
        return tuple(eval_dim(d, opts.dims()) for d in t.shape)

    def symbolic_shape(self, t: TensorDesc, opts: ExportOptions) -> list[Dim]:
        """Manifest shape: ints, and the expression for every dim that depends on a free dim."""
        free = self._free(opts)
        return [d if (dim_names(d) & free) else eval_dim(d, opts.dims()) for d in t.shape]

    def dynamic_axes(self, opts: ExportOptions) -> dict[str, dict[int, str]]:
        axes = {}
        for t in (*self.inputs, *self.outputs):
            ax = {i: d for i, d in enumerate(self.symbolic_shape(t, opts)) if isinstance(d, str)}
            if ax:
                axes[t.name] = ax
        return axes

    def profile(self, opts: ExportOptions) -> dict[str, dict[str, list[int]]]:
        """min/opt/max shapes of every input with a dynamic dim (empty for static exports)."""
        free, out = self._free(opts), {}
        for t in self.inputs:
            if not any(dim_names(d) & free for d in t.shape):
                continue
            pts = {}
            for k, idx in (("min", 0), ("opt", 1), ("max", 2)):
                dims = {**opts.dims(), **{n: r[idx] for n, r in opts.ranges().items() if n in free}}
                pts[k] = [eval_dim(d, dims) for d in t.shape]
            out[t.name] = pts
        return out

    def sample_inputs(self, opts: ExportOptions, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        feed = {t.name: t.sample(self.shape(t, opts), g, opts.dims()) for t in self.inputs}
        for t in self.inputs:
            want = torch.int32 if t.dtype == "int32" else torch.float32
            if feed[t.name].dtype != want:
                raise TypeError(f"{self.name}: sample for {t.name} is {feed[t.name].dtype}, expected {want}")
        return feed
