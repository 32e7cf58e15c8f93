"""The graphs a live session runs, behind one call signature, for every backend.

A live session calls six graphs by role, each as `runner(feed: dict[str, Tensor]) -> dict[str, Tensor]`
with the exporter's tensor names (export/specs.py), so an output feeds the input of the same name:

| role | export graph | runs |
|---|---|---|
| encoder | vae_encoder / taesd_encoder | per source |
| reference | reference | per source and step |
| hint | hint | per frame |
| control | control | per frame and step |
| unet_stream | unet_stream | per frame and step (temporal ring caches) |
| decoder | taesd_decoder / vae_decoder | per frame |

Backends: `torch` (the export wrappers' own modules, eager), `torch-kernels` (the same with the Triton
kernels and, on CUDA, CUDA-graph replay keyed by input addresses), `ort` (the ONNX files of an export
folder through ONNX Runtime) and `trt` (the plans of that folder through TensorRT). Every runner
also says which dtype each input wants (`input_dtypes`), so the session allocates its persistent
buffers in that dtype once and never casts per call, and whether its unet_stream stores the new K/V
in the rings itself (`writes_ring`: the torch path writes in place, exactly once; graph backends
return k_new/v_new and the session writes them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROLES = ("encoder", "reference", "hint", "control", "unet_stream", "decoder")
Runner = Callable[[dict], dict]


@dataclass
class Graphs:
    runners: dict[str, Runner]
    input_dtypes: dict[str, dict[str, torch.dtype]]  # role -> input name -> dtype the runner wants
    input_names: dict[str, list[str]]
    writes_ring: bool = False      # unet_stream stores k_new/v_new in the ring in place
    window: int | None = None      # fixed by the graphs (exported ring slots - 1); None: any
    max_batch: int | None = None   # largest batch every graph takes (static exports: their batch); None: any
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, role: str) -> Runner:
        return self.runners[role]


def export_names(encoder: str, decoder: str) -> dict[str, str]:
    return {"encoder": f"{encoder}_encoder", "reference": "reference", "hint": "hint", "control": "control",
            "unet_stream": "unet_stream", "decoder": f"{decoder}_decoder"}


# ------------------------------------------------------------------------------------ torch
class _Module:
    """An export wrapper module called with a feed dict (positional in the spec's input order)."""

    def __init__(self, module: torch.nn.Module, inputs: list[str], outputs: list[str]):
        self.module, self.inputs, self.outputs = module, inputs, outputs

    @torch.inference_mode()
    def __call__(self, feed: dict) -> dict:
        out = self.module(*(feed[n] for n in self.inputs))
        return dict(zip(self.outputs, out))


class _StreamUNet:
    """unet_stream in PyTorch that writes the new temporal K/V into the rings itself (exactly once)."""

    def __init__(self, unet: torch.nn.Module, n_ref: int, n_ctrl: int, n_layers: int):
        from models.streaming import StreamingUNet
        self.stream = StreamingUNet(unet)
        self.n_ref, self.n_ctrl, self.n_layers = n_ref, n_ctrl, n_layers

    @torch.inference_mode()
    def __call__(self, feed: dict) -> dict:
        x = feed["x"]
        ref = [(feed[f"ref_k_{i:02d}"], feed[f"ref_v_{i:02d}"]) for i in range(self.n_ref)]
        ctrl = [feed[f"ctrl_{i:02d}"] for i in range(self.n_ctrl)]
        if "k_cache_00" in feed:
            kc = [feed[f"k_cache_{i:02d}"] for i in range(self.n_layers)]
            vc = [feed[f"v_cache_{i:02d}"] for i in range(self.n_layers)]
        else:
            kc = vc = None
        ctx = feed["context"].expand(x.shape[0], -1, -1)
        eps, _, _ = self.stream(x, feed["t"], ctx, ref, ctrl, kc, vc, feed["write_slot"], feed["n_past"],
                                write_ring=True)
        return {"eps": eps}


def torch_graphs(model, taesd, encoder: str, decoder: str, dtype: torch.dtype, kernels: bool = False,
                 cuda_graphs: bool = False) -> Graphs:
    """Runners over the model's own modules (the exporter's wrappers), in `dtype` (KL VAE: fp32)."""
    from export.specs import build_specs
    from export.wrappers import Control, Decode, Encode, Hint, Reference
    specs = build_specs(model.cfg)
    names = export_names(encoder, decoder)
    ae = {"vae": model.first_stage_model, "taesd": taesd}
    if ae[encoder] is None or ae[decoder] is None:
        raise ValueError("--encoder/--decoder taesd needs TAESD weights (--taesd)")
    model.set_attention_kernels(kernels)
    mods = {"encoder": Encode(ae[encoder]), "reference": Reference(model.appearance_control_model, model.unet),
            "hint": Hint(model.pose_control_model, model.local_pose_control_model),
            "control": Control(model.pose_control_model, model.local_pose_control_model),
            "decoder": Decode(ae[decoder])}
    runners, dtypes, inputs = {}, {}, {}
    for role, export_name in names.items():
        spec = specs[export_name]
        inputs[role] = [t.name for t in spec.inputs]
        graph_dtype = dtype if spec.fp16 or role == "unet_stream" else torch.float32
        if role in ("encoder", "decoder"):
            graph_dtype = next(ae[encoder if role == "encoder" else decoder].parameters()).dtype
        dtypes[role] = {t.name: (torch.int32 if t.dtype == "int32" else torch.float32 if t.dtype == "float32"
                                 else graph_dtype) for t in spec.inputs}
        if role == "unet_stream":
            n_ref = sum(t.name.startswith("ref_k_") for t in spec.inputs)
            n_ctrl = sum(t.name.startswith("ctrl_") for t in spec.inputs)
            n_layers = sum(t.name.startswith("k_cache_") for t in spec.inputs)
            runners[role] = _StreamUNet(model.unet, n_ref, n_ctrl, n_layers)
        else:
            runners[role] = _Module(mods[role], inputs[role], [t.name for t in spec.outputs])
    if cuda_graphs:
        from runtime.live.cudagraph import GraphReplay
        for role in ("hint", "control", "unet_stream", "decoder"):
            runners[role] = GraphReplay(runners[role], name=role)
    return Graphs(runners, dtypes, inputs, writes_ring=True)


# -------------------------------------------------------------------------- export folders
def _manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no manifest.json: export the graphs first "
                                f"(python -m export --preset tiny --out {folder})")
    return json.loads(path.read_text())


def _entries(folder: Path, encoder: str, decoder: str) -> tuple[dict, dict[str, dict]]:
    man = _manifest(folder)
    by_name = {e["name"]: e for e in man.get("engines", [])}
    picked = {}
    for role, name in export_names(encoder, decoder).items():
        if name not in by_name:
            raise FileNotFoundError(f"{folder}/manifest.json has no graph {name!r} (role {role}); export it: "
                                    f"python -m export --modules {name} ...")
        picked[role] = by_name[name]
    return man, picked


def _ring_window(man: dict) -> int | None:
    slots = (man.get("caches", {}).get("temporal_kv") or {}).get("slots")
    return None if slots is None else int(slots) - 1


def _max_batch(man: dict) -> int | None:
    preset = man.get("preset") or {}
    return None if preset.get("dynamic") or preset.get("batch") is None else int(preset["batch"])


_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int32)": torch.int32,
               "tensor(int64)": torch.int64, "tensor(double)": torch.float64}


def ort_graphs(folder: str | Path, encoder: str = "vae", decoder: str = "taesd",
               providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Graphs:
    """ONNX Runtime sessions over an export folder's graphs (found through manifest.json)."""
    from runtime.backends import OrtBackend
    folder = Path(folder)
    man, picked = _entries(folder, encoder, decoder)
    runners, dtypes, inputs = {}, {}, {}
    for role, entry in picked.items():
        be = OrtBackend(folder / entry["onnx"]["file"], providers)
        runners[role], inputs[role] = be, list(be.input_names)
        dtypes[role] = {i.name: _ORT_DTYPES[i.type] for i in be.session.get_inputs()}
    return Graphs(runners, dtypes, inputs, writes_ring=False, window=_ring_window(man), max_batch=_max_batch(man),
                  notes=[f"ONNX Runtime over {folder}"])


def trt_graphs(folder: str | Path, encoder: str = "vae", decoder: str = "taesd", cuda_graphs: bool = True) -> Graphs:
    """TensorRT engines of an export folder (built with `python -m engines build DIR`); GPU only."""
    from engines.engine import TORCH_DTYPES
    from runtime.backends import TrtBackend
    folder = Path(folder)
    man, picked = _entries(folder, encoder, decoder)
    runners, dtypes, inputs = {}, {}, {}
    for role, entry in picked.items():
        plan = (entry.get("engine") or {}).get("file")
        if not plan:
            raise FileNotFoundError(f"{folder}: graph {entry['name']} has no engine yet; build it: "
                                    f"python -m engines build {folder}")
        be = TrtBackend(folder / plan, use_cuda_graph=cuda_graphs)
        runners[role], inputs[role] = be, list(be.input_names)
        dtypes[role] = {t["name"]: TORCH_DTYPES[t["dtype"]] for t in entry["inputs"]}
    return Graphs(runners, dtypes, inputs, writes_ring=False, window=_ring_window(man), max_batch=_max_batch(man),
                  notes=[f"TensorRT over {folder}"])
