"""Load what live sessions share (weights or engines, CLIP(""), the schedule) once; make sessions from it.

    live = load_live(LiveConfig.from_name("tiny"))            # seeded random weights, CPU
    session = live.new_session()
    session.set_source(source_rgb)                             # (R, R, 3) uint8
    out = session.step(pose_rgb, local_rgb, tag=t_capture)     # Output(image (R, R, 3) uint8, tag)

Backends `torch`/`torch-kernels` build the model in PyTorch (a checkpoint, or seeded random weights
with a banner that says so); `ort`/`trt` run the graphs of an export folder (`--engines DIR`,
made by `python -m export` and `python -m engines build`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime.live.config import LiveConfig
from runtime.live.graphs import Graphs, ort_graphs, torch_graphs, trt_graphs
from runtime.live.session import LiveSession


@dataclass
class LiveModel:
    """Everything sessions share: graphs (weights/engines), context, schedule, ring geometry."""
    cfg: LiveConfig
    graphs: Graphs
    context: torch.Tensor
    alphas_cumprod: torch.Tensor
    ring_layout: list[tuple[int, int]]
    random_weights: bool
    notes: list[str] = field(default_factory=list)
    modalities: tuple[str, ...] = ("rgb",)  # the main UNet's latent layout; ("rgb", "depth"): rgbd presets

    def new_session(self, **overrides) -> LiveSession:
        """A session with its own caches and counters; overrides of LiveConfig fields that do not
        change the graphs (steps, window, stream_batch, sampler, seed, init)."""
        from dataclasses import replace
        cfg = replace(self.cfg, **overrides) if overrides else self.cfg
        return LiveSession(self.graphs, cfg, self.context, self.alphas_cumprod, self.ring_layout,
                           modalities=self.modalities)


def ring_layout(preset: str, size: int) -> list[tuple[int, int]]:
    """(H_l*W_l, C_l) of each temporal ring, from the export spec of unet_stream (one element)."""
    from export.spec import ExportOptions
    from export.specs import build_specs
    from models.config import XPortraitConfig
    spec = build_specs(XPortraitConfig.from_name(preset))["unet_stream"]
    opts = ExportOptions(latent_hw=(size // 8, size // 8), batch=1, slots=2)
    return [spec.shape(t, opts)[1:] for t in spec.inputs if t.name.startswith("k_cache_")]


def load_live(cfg: LiveConfig, checkpoint=None, taesd=None, lora=None, engines=None) -> LiveModel:
    """Validate the config, then build the graphs for its backend."""
    cfg = cfg.validated()
    if cfg.backend in ("ort", "trt"):
        if engines is None:
            raise ValueError(f"--backend {cfg.backend} runs an export folder: pass --engines DIR "
                             "(python -m export --out DIR, then python -m engines build DIR for trt)")
        folder = Path(engines)
        _check_export(folder, cfg)
        graphs = (ort_graphs(folder, cfg.encoder, cfg.decoder) if cfg.backend == "ort"
                  else trt_graphs(folder, cfg.encoder, cfg.decoder, cfg.cuda_graphs))
        context = _read_context(folder)
        weights = (json.loads((folder / "manifest.json").read_text()).get("preset") or {}).get("weights", "")
        random = str(weights).startswith("random")
        alphas, layout, modalities = _shared_facts(cfg)
        return LiveModel(cfg, graphs, context, alphas, layout, random, list(graphs.notes), modalities)
    from runtime.pipeline import load_models
    models = load_models(cfg.preset, checkpoint=checkpoint, lora=lora, taesd=taesd,
                         need_taesd="taesd" in (cfg.encoder, cfg.decoder), seed=cfg.seed, device=cfg.device,
                         dtype=cfg.torch_dtype)
    return live_from_models(cfg, models)


def live_from_models(cfg: LiveConfig, models) -> LiveModel:
    """A torch-backend LiveModel over already loaded weights (runtime.pipeline.Models), e.g. shared by the
    configurations of a benchmark."""
    kernels = cfg.backend == "torch-kernels"
    graphs = torch_graphs(models.model, models.taesd, cfg.encoder, cfg.decoder, cfg.torch_dtype, kernels=kernels,
                          cuda_graphs=kernels and cfg.device.startswith("cuda") and cfg.cuda_graphs)
    alphas, layout, modalities = _shared_facts(cfg)
    return LiveModel(cfg, graphs, models.context.float().cpu(), alphas, layout, models.random_weights,
                     list(models.notes), modalities)


def _shared_facts(cfg: LiveConfig) -> tuple:
    """What every backend's sessions need from the preset: the DDPM schedule, ring geometry, latent layout."""
    from models.config import XPortraitConfig
    from models.schedule import ddpm_buffers
    mcfg = XPortraitConfig.from_name(cfg.preset)
    alphas = ddpm_buffers(mcfg.schedule)["alphas_cumprod"].float()
    return alphas, ring_layout(cfg.preset, cfg.image_size()), mcfg.unet.modalities


def _check_export(folder: Path, cfg: LiveConfig) -> None:
    man_path = folder / "manifest.json"
    if not man_path.is_file():
        raise FileNotFoundError(f"--engines {folder}: no manifest.json there; export first: "
                                f"python -m export --preset {cfg.preset} --out {folder}")
    man = json.loads(man_path.read_text())
    preset = (man.get("preset") or {}).get("name")
    if preset is not None and preset != cfg.preset and cfg.preset.endswith("-rgbd"):
        raise ValueError(f"--engines {folder} holds preset {preset!r} graphs, not the rgbd ones --depth needs: "
                         f"export them with python -m export --preset {cfg.preset} --out DIR (from a checkpoint "
                         "converted by python -m models.rgbd convert)")
    if preset is not None and preset != cfg.preset:
        raise ValueError(f"--engines {folder} holds preset {preset!r} graphs; pass --preset {preset}")


def _read_context(folder: Path) -> torch.Tensor:
    from safetensors.torch import load_file
    path = folder / "context.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: re-export the folder (python -m export ...)")
    return load_file(str(path))["context"][:1].float()
