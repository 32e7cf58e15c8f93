"""Backends with one call signature: `backend(feed: dict[str, Tensor]) -> dict[str, Tensor]`.

Each has `.input_names` and `.output_names`, so the pipeline, tests and the parity check do not care
whether a component runs in PyTorch, ONNX Runtime or TensorRT.

- TorchBackend: an nn.Module (keyword or positional call); outputs mapped to output_names.
- OrtBackend:   an .onnx file through onnxruntime; tensors go through numpy, dtypes are kept, and
                outputs come back on the device of the inputs.
- TrtBackend:   a TensorRT plan through engines.engine.Engine (GPU only). Outputs are the engine's
                static buffers, overwritten by the next call: clone what you keep. It runs on the
                current CUDA stream; run it under `with torch.cuda.stream(s)` (TensorRT is slower on
                the legacy default stream).

Idea from StreamDiffusion's engine wrappers and FasterLivePortrait's `predict_type`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

Feed = Mapping[str, torch.Tensor]


def _check_names(feed: Feed, input_names: Sequence[str], who: str) -> None:
    missing = [n for n in input_names if n not in feed]
    extra = [n for n in feed if n not in input_names]
    if missing or extra:
        raise KeyError(f"{who}: feed is missing {missing} and has unexpected {extra}; inputs are {list(input_names)}")


class TorchBackend:
    def __init__(self, module: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str],
                 positional: bool = False):
        self.module = module
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.positional = positional  # call module(*inputs in input order) instead of module(**feed)

    @torch.inference_mode()
    def __call__(self, feed: Feed) -> dict[str, torch.Tensor]:
        _check_names(feed, self.input_names, "TorchBackend")
        if self.positional:
            out = self.module(*(feed[n] for n in self.input_names))
        else:
            out = self.module(**{n: feed[n] for n in self.input_names})
        if isinstance(out, Mapping):
            missing = [n for n in self.output_names if n not in out]
            if missing:
                raise KeyError(f"TorchBackend: module returned keys {list(out)}, missing outputs {missing}")
            return {n: out[n] for n in self.output_names}
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        if len(outs) != len(self.output_names):
            raise ValueError(f"TorchBackend: module returned {len(outs)} outputs, expected {self.output_names}")
        return dict(zip(self.output_names, outs))


class OrtBackend:
    def __init__(self, onnx_path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.path = Path(onnx_path)
        self.session = ort.InferenceSession(str(self.path), providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._types = {i.name: i.type for i in self.session.get_inputs()}  # e.g. "tensor(float16)"

    def __call__(self, feed: Feed) -> dict[str, torch.Tensor]:
        _check_names(feed, self.input_names, "OrtBackend")
        arrays = {}
        for n in self.input_names:
            t = feed[n]
            if t.dtype == torch.bfloat16:
                raise TypeError(f"OrtBackend: input {n!r} is bfloat16, which numpy cannot hold; "
                                "export the graph in float16/float32")
            arrays[n] = t.detach().cpu().contiguous().numpy()
            want = self._types[n]
            if want != f"tensor({_ort_name(arrays[n].dtype)})":
                raise TypeError(f"OrtBackend: input {n!r} is {t.dtype}, the graph wants {want}")
        device = next(iter(feed.values())).device if feed else torch.device("cpu")
        outs = self.session.run(self.output_names, arrays)
        return {n: torch.from_numpy(a).to(device) for n, a in zip(self.output_names, outs)}


def _ort_name(np_dtype) -> str:
    """numpy dtype -> the element type name onnxruntime prints in `tensor(...)`."""
    name = str(np_dtype)
    return {"float32": "float", "float64": "double"}.get(name, name)


class TrtBackend:
    def __init__(self, engine_path: str | Path, flavour: str | None = None, use_cuda_graph: bool = False):
        from engines.engine import Engine  # GPU only; imports TensorRT

        self.engine = Engine(engine_path, flavour=flavour, use_cuda_graph=use_cuda_graph)
        self.engine.activate()
        self.input_names = self.engine.input_names
        self.output_names = self.engine.output_names

    def __call__(self, feed: Feed) -> dict[str, torch.Tensor]:
        return self.engine.infer(feed)
