"""Live runtime configuration: one dataclass, named presets, validated before anything is loaded."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from runtime.live.sampling import LIVE_SAMPLERS

BACKENDS = ("torch", "torch-kernels", "ort", "trt")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DECODERS = ("taesd", "vae")
ENCODERS = ("vae", "taesd")
MAX_WINDOW = 15  # past frames the motion modules were trained to see (16-frame windows)


@dataclass(frozen=True)
class LiveConfig:
    """Everything that shapes a live session. Resolve a preset with `LiveConfig.from_name`."""
    preset: str = "tiny"            # model preset (models/config.py): tiny, sd15
    resolution: int | None = None   # square pixels; None: the preset's (tiny 128, sd15 512)
    sampler: str = "lcm"            # lcm / tcd (few-step, distilled) or ddim
    steps: int = 2                  # denoising steps per frame (1-4 for LCM/TCD)
    gamma: float = 0.3              # TCD stochasticity
    window: int = MAX_WINDOW        # past frames the motion modules attend to (0 = only the current frame)
    stream_batch: bool = False      # StreamDiffusion-style: the S steps of S successive frames in one batched call
    decoder: str = "taesd"          # per-frame decoder: taesd (default) or the full KL vae
    encoder: str = "vae"            # per-source encoder (runs once per source): vae or taesd
    backend: str = "torch"          # torch (eager), torch-kernels (Triton kernels + CUDA graphs), ort, trt
    dtype: str = "fp32"             # model dtype for torch backends: fp32, fp16, bf16
    ring_dtype: str | None = None   # temporal K/V ring storage: None = the graph's dtype, or fp8 (torch backends:
                                    # half the ring memory of fp16; values rounded to e4m3 when stored)
    device: str = "cpu"
    init: str = "official"          # x_T: official (source latent noised to t=999) or noise
    seed: int = 0                   # random weights, x_T noise and the per-step noise
    cuda_graphs: bool = True        # capture the per-step work in CUDA graphs (torch-kernels on CUDA)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LiveConfig":
        if name not in LIVE_PRESETS:
            raise KeyError(f"unknown live preset {name!r}; choose one of {', '.join(sorted(LIVE_PRESETS))}")
        return replace(LIVE_PRESETS[name], **overrides)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def image_size(self) -> int:
        from models.config import XPortraitConfig
        return self.resolution or XPortraitConfig.from_name(self.preset).image_size

    def validated(self) -> "LiveConfig":
        """Check every option before any model is built; messages name the CLI flag and the fix."""
        if self.sampler not in LIVE_SAMPLERS:
            raise ValueError(f"--sampler {self.sampler!r}: choose one of {', '.join(LIVE_SAMPLERS)}")
        top = 8 if self.sampler in ("lcm", "tcd") else 50
        if not 1 <= self.steps <= top:
            raise ValueError(f"--steps {self.steps}: {self.sampler} takes 1..{top} steps per frame (1-4 is live)")
        if not 0 <= self.window <= MAX_WINDOW:
            raise ValueError(f"--window {self.window}: past frames seen by the motion modules must be in "
                             f"0..{MAX_WINDOW} (0 = only the current frame, {MAX_WINDOW} = the trained window)")
        for flag, value, allowed in (("--backend", self.backend, BACKENDS), ("--dtype", self.dtype, DTYPES),
                                     ("--decoder", self.decoder, DECODERS), ("--encoder", self.encoder, ENCODERS)):
            if value not in allowed:
                raise ValueError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
        if self.ring_dtype not in (None, "fp8"):
            raise ValueError(f"--ring-dtype {self.ring_dtype!r}: leave it unset (the graph's dtype) or use fp8")
        if self.ring_dtype == "fp8" and not self.backend.startswith("torch"):
            raise ValueError("--ring-dtype fp8 needs --backend torch or torch-kernels (exported graphs keep their "
                             "ring dtype)")
        size = self.image_size()
        if size % 64:
            raise ValueError(f"--resolution {size}: must be a multiple of 64 (the UNet halves the 1/8 latent "
                             "3 times)")
        if self.init not in ("official", "noise"):
            raise ValueError(f"--init {self.init!r}: choose official or noise")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA GPU is visible; use --device cpu")
        if self.backend == "trt" and not self.device.startswith("cuda"):
            raise ValueError("--backend trt needs --device cuda (TensorRT runs on NVIDIA GPUs only)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


LIVE_PRESETS: dict[str, LiveConfig] = {
    # CPU demo and tests: tiny model, random weights unless a checkpoint is given
    "tiny": LiveConfig(),
    # the product on one GPU: sd15, 2 LCM steps, fp16, Triton kernels + CUDA graphs, TAESD decode
    "sd15": LiveConfig(preset="sd15", steps=2, dtype="fp16", backend="torch-kernels", device="cuda"),
    # more steps, the full VAE decoder: slower, cleaner pictures
    "sd15-quality": LiveConfig(preset="sd15", steps=4, dtype="fp16", backend="torch-kernels", device="cuda",
                               decoder="vae"),
    # throughput: the steps of successive frames batched (adds steps-1 frames of delay)
    "sd15-throughput": LiveConfig(preset="sd15", steps=2, dtype="fp16", backend="torch-kernels", device="cuda",
                                  stream_batch=True),
}
