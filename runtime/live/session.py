"""One live session: a source portrait, its caches, and the streaming denoise of driving frames.

Work is split by the rate it changes at (spec §9.4):

* per source (`set_source`): encode the source, run the reference net for every timestep of the
  few-step grid, and the initial latent x_T (constant per source: the source latent noised to
  t = 999 with fixed noise). Swapping the source recomputes only these.
* per frame (`step`): both hint encoders once, then per denoising step the ControlNets and the
  streaming UNet with its temporal ring caches (one ring set per step index, counters per ring
  element), then the decoder.

The sampler is an affine table per step (runtime/live/sampling.py) with fixed per-step noise,
as StreamDiffusion does for steady video. All state lives in persistent device buffers, written in
place: the per-frame path allocates nothing that a captured CUDA graph would see move, and nothing
in it reads a device value on the host.

Two schedules share every buffer:
* sequential (default, lowest latency): each frame runs its S steps one after another and comes
  out in the same call;
* stream batch (StreamDiffusion's): one call runs step 0 of frame f, step 1 of frame f-1, ...,
  step S-1 of frame f-S+1 as one batch of S ring elements, each with its own timestep, reference
  K/V and ring rows. Higher throughput; each frame comes out S-1 calls later. Frame for frame it
  computes exactly what the sequential schedule computes (tests/test_live_session.py).

rgbd presets (a joint RGB + depth latent, models/rgbd.py) run through the same code: the latent
layout's few differences (channel count, the ControlNets' rgb slice, per-modality t, the decoder's
depth output) are in runtime/live/depth.py `LatentLayout`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from runtime.live.config import LiveConfig
from runtime.live.depth import LatentLayout, layout_noise
from runtime.live.graphs import Graphs
from runtime.live.sampling import StepTable, initial_latent, step_table


@dataclass
class Output:
    image: torch.Tensor  # (R, R, 3) uint8 RGB on the session's device
    tag: Any             # what was passed with the driving frame (e.g. its capture time)
    depth: torch.Tensor | None = None  # rgbd models: (R, R) float32 normalized depth (near -1), on the device


class LiveSession:
    """Streaming reenactment of one source. `graphs` may be shared by several sessions."""

    def __init__(self, graphs: Graphs, cfg: LiveConfig, context: torch.Tensor, alphas_cumprod: torch.Tensor,
                 ring_layout: list[tuple[int, int]], latent_channels: int = 4,
                 modalities: tuple[str, ...] = ("rgb",)):
        """latent_channels: per modality group; modalities: the model's latent layout (cfg.unet.modalities,
        e.g. ("rgb", "depth") for rgbd presets: runtime/live/depth.py)."""
        self.cfg, self.graphs = cfg.validated(), graphs
        if graphs.window is not None and graphs.window != cfg.window:
            raise ValueError(f"--window {cfg.window}: these graphs were exported with {graphs.window + 1} ring "
                             f"slots; use --window {graphs.window} or re-export with --slots {cfg.window + 1}")
        self.device = torch.device(cfg.device)
        self.size = cfg.image_size()
        h = w = self.size // 8
        self.table: StepTable = step_table(cfg.sampler, alphas_cumprod, cfg.steps, cfg.gamma)
        self.alphas = alphas_cumprod.float().cpu()
        S = self.steps = len(self.table)
        dev = self.device
        dt = graphs.input_dtypes
        self._ctx = {role: context.to(dev, dt[role]["context"]) for role in ("reference", "control", "unet_stream")}
        self.t = self.table.timesteps.float().to(dev)                      # (S,) float32, as the graphs take t
        self.latent = LatentLayout(modalities, latent_channels, self.t, (h, w), dt, graphs.max_batch)
        latent_channels = self.latent.channels
        # the sampler state stays fp32; x_in is the model-dtype copy every graph reads
        self.x_T = torch.zeros(1, latent_channels, h, w, device=dev)
        self.x = torch.zeros(S, latent_channels, h, w, device=dev)
        self.x_in = torch.zeros(S, latent_channels, h, w, device=dev, dtype=dt["unet_stream"]["x"])
        self.x_dec = torch.zeros(1, latent_channels, h, w, device=dev, dtype=dt["decoder"]["latent"])
        self.coef = [c.to(dev).view(S, 1, 1, 1) for c in (self.table.a, self.table.b, self.table.c)]
        g = torch.Generator().manual_seed(cfg.seed)
        self.noise_init, self.noise = (n.to(dev) for n in layout_noise(g, modalities, self.latent.group_channels,
                                                                          S, h, w))
        # hint inputs (uint8 uploads are converted into these) and per-element hint features
        self.pose = torch.zeros(1, 3, self.size, self.size, device=dev, dtype=dt["hint"]["pose_hint"])
        self.local = torch.zeros_like(self.pose)
        self.z_src: torch.Tensor | None = None
        self.ref: list[dict[str, torch.Tensor]] = []   # per step: ref_k_NN / ref_v_NN, batch 1
        self.ref_all: dict[str, torch.Tensor] = {}     # stream batch: (S, M, C) per name
        self._alloc_rings(ring_layout, dt["unet_stream"])
        # stream-batch bookkeeping: element i holds frame f-i; host-side count, device-side masks
        self._filled = 0
        self._tags: list[Any] = [None] * S
        self._active = [torch.arange(S, device=dev) <= k for k in range(S)]
        self._feat: dict[str, torch.Tensor] | None = None
        self.frames = 0
        self._clock = None
        from models.finite import FiniteMonitor  # NaN/Inf flag on the device, read without a per-frame sync
        self.finite = FiniteMonitor(self.device, every=8 if self.device.type == "cuda" else 1)

    # ---------------------------------------------------------------------------- state
    def _alloc_rings(self, layout: list[tuple[int, int]], dtypes: dict[str, torch.dtype]) -> None:
        """One ring per motion-attention layer, rows of all S step elements: (L, S*HW_l, C_l)."""
        S, dev = self.steps, self.device
        self.slots = self.cfg.window + 1
        self.write_slot = torch.zeros(S, dtype=torch.int32, device=dev)
        self.n_past = torch.zeros(S, dtype=torch.int32, device=dev)
        self.layout = layout
        if self.cfg.window == 0:
            self.k_ring = self.v_ring = []
            return
        fp8 = self.cfg.ring_dtype == "fp8"
        self.k_ring = [torch.zeros(self.slots, S * hw, c, device=dev,
                                   dtype=torch.float8_e4m3fn if fp8 else dtypes[f"k_cache_{i:02d}"])
                       for i, (hw, c) in enumerate(layout)]
        self.v_ring = [torch.zeros_like(k) for k in self.k_ring]

    def _ring_feed(self, rows: slice, elements: slice) -> dict[str, torch.Tensor]:
        """Feed entries for ring elements `elements` (views of the shared rings: no copy)."""
        feed = {"write_slot": self.write_slot[elements], "n_past": self.n_past[elements]}
        for i, (hw, _) in enumerate(self.layout):
            if self.k_ring:
                r = slice(rows.start * hw, rows.stop * hw)
                feed[f"k_cache_{i:02d}"] = self.k_ring[i][:, r]
                feed[f"v_cache_{i:02d}"] = self.v_ring[i][:, r]
        return feed

    def reset(self) -> None:
        """Forget the temporal history (all rings) without touching the per-source caches."""
        from models.streaming import ring_reset
        ring_reset(self.write_slot, self.n_past)
        self._filled = 0
        self._tags = [None] * self.steps

    def memory(self) -> dict[str, int]:
        """Bytes of the session's own device state (the graphs' weights are shared and not counted)."""
        ring = sum(t.numel() * t.element_size() for t in (*self.k_ring, *self.v_ring))
        ref = sum(t.numel() * t.element_size() for d in self.ref for t in d.values())
        ref += sum(t.numel() * t.element_size() for t in self.ref_all.values())
        other = sum(t.numel() * t.element_size() for t in (self.x, self.x_in, self.x_T, self.noise, self.pose,
                                                           self.local))
        return {"rings": ring, "reference_kv": ref, "other": other, "total": ring + ref + other}

    # ------------------------------------------------------------------------ per source
    @torch.inference_mode()
    def set_source(self, image: torch.Tensor) -> None:
        """image: (1, 3, R, R) in [-1, 1] (any device/dtype), or (R, R, 3) uint8. Recomputes the
        per-source caches only; the temporal rings are kept (call reset() to clear them too)."""
        image = self._as_image(image, self.graphs.input_dtypes["encoder"]["image"])
        z = self.graphs["encoder"]({"image": image})["latent"].float()
        self.z_src = z
        self.x_T.copy_(initial_latent(self.alphas, self.latent.source(z), self.noise_init, self.cfg.init))
        ref_dtype = self.graphs.input_dtypes["reference"]["ref_latent"]
        for i in range(self.steps):
            out = self.graphs["reference"]({"ref_latent": z.to(ref_dtype), "t": self.t[i:i + 1],
                                            "context": self._ctx["reference"]})
            want = self.graphs.input_dtypes["unet_stream"]
            if len(self.ref) <= i:
                self.ref.append({n: v.to(want[n]).clone() for n, v in out.items()})
            else:
                for n, v in out.items():
                    self.ref[i][n].copy_(v)
        if self.cfg.stream_batch:
            for n in self.ref[0]:
                stacked = torch.cat([r[n] for r in self.ref])
                if n in self.ref_all:
                    self.ref_all[n].copy_(stacked)
                else:
                    self.ref_all[n] = stacked

    def _as_image(self, image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            image = torch.as_tensor(image)
        if image.dtype == torch.uint8:
            if image.dim() != 3 or image.shape[-1] != 3:
                raise ValueError(f"a uint8 image must be (R, R, 3) RGB, got {tuple(image.shape)}")
            image = image.to(self.device).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        if tuple(image.shape) != (1, 3, self.size, self.size):
            raise ValueError(f"expected a (1, 3, {self.size}, {self.size}) image in [-1, 1] "
                             f"(resize/crop to --resolution {self.size} first), got {tuple(image.shape)}")
        return image.to(self.device, dtype)

    # ------------------------------------------------------------------------- per frame
    @torch.inference_mode()
    def step(self, pose: torch.Tensor, local: torch.Tensor, tag: Any = None, clock=None) -> Output | None:
        """One driving frame: pose and local hints as (1, 3, R, R) in [-1, 1] or (R, R, 3) uint8.

        Returns the animated frame with the tag of its driving frame: this frame's (sequential),
        or the one S-1 calls earlier (stream batch; None while the batch fills up). `clock`
        (runtime/live/clock.StageClock, started by the caller) gets a mark after each stage."""
        if self.z_src is None:
            raise RuntimeError("no source yet: call set_source(image) first")
        self.pose.copy_(self._as_image(pose, self.pose.dtype))
        self.local.copy_(self._as_image(local, self.local.dtype))
        self._clock = clock
        self._mark("convert")
        feat = self.graphs["hint"]({"pose_hint": self.pose, "local_hint": self.local})
        self._mark("hint")
        self.frames += 1
        if self.cfg.stream_batch:
            return self._step_batched(feat, tag)
        return self._decode(self._denoise(feat), tag)

    def _mark(self, stage: str) -> None:
        if self._clock is not None:
            self._clock.mark(stage)

    def _denoise(self, feat: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sequential schedule: S steps of this frame, each on its own ring element."""
        from models.streaming import ring_advance
        a, b, c = self.coef
        x = self.x[:1]
        x.copy_(self.x_T)
        for i in range(self.steps):
            xin = self.x_in[i:i + 1]
            xin.copy_(x)
            t, rows = self.t[i:i + 1], slice(i, i + 1)
            ctrl = self.graphs["control"]({"x": self.latent.control_x(xin, rows), "t": t,
                                           "context": self._ctx["control"], **feat})
            self._mark("control")
            feed = {"x": xin, "t": self.latent.unet_t(t, rows), "context": self._ctx["unet_stream"], **self.ref[i],
                    **ctrl, **self._ring_feed(rows, rows)}
            out = self.graphs["unet_stream"](feed)
            if not self.graphs.writes_ring and self.k_ring:
                self._write_new(out, slice(i, i + 1), feed)
            self._mark("unet")
            x.mul_(a[i]).add_(b[i] * out["eps"].float())
            if i < self.steps - 1:
                x.add_(c[i] * self.noise[i:i + 1])
        ring_advance(self.write_slot, self.n_past, self.slots)
        self._mark("sampler")
        return x

    def _write_new(self, out: dict, elements: slice, feed: dict) -> None:
        from models.streaming import ring_write
        n = len(self.layout)
        ring_write([feed[f"k_cache_{i:02d}"] for i in range(n)], [feed[f"v_cache_{i:02d}"] for i in range(n)],
                   [out[f"k_new_{i:02d}"] for i in range(n)], [out[f"v_new_{i:02d}"] for i in range(n)],
                   feed["write_slot"])

    def _step_batched(self, feat: dict[str, torch.Tensor], tag: Any) -> Output | None:
        """Stream batch: element i runs step i of the frame that entered i calls ago."""
        from models.streaming import ring_advance
        S = self.steps
        if self._feat is None:
            self._feat = {n: torch.zeros((S, *v.shape[1:]), dtype=v.dtype, device=v.device) for n, v in feat.items()}
        for n, v in feat.items():  # element i <- features of frame f-i
            buf = self._feat[n]
            buf[1:] = buf[:-1].clone()
            buf[:1].copy_(v)
        self._tags = [tag, *self._tags[:-1]]
        self.x[:1].copy_(self.x_T)
        self.x_in.copy_(self.x)
        every = slice(0, S)
        ctrl = self.graphs["control"]({"x": self.latent.control_x(self.x_in, every), "t": self.t,
                                       "context": self._ctx["control"], **self._feat})
        self._mark("control")
        feed = {"x": self.x_in, "t": self.latent.unet_t(self.t, every), "context": self._ctx["unet_stream"],
                **self.ref_all, **ctrl, **self._ring_feed(every, every)}
        out = self.graphs["unet_stream"](feed)
        if not self.graphs.writes_ring and self.k_ring:
            self._write_new(out, slice(0, S), feed)
        self._mark("unet")
        a, b, c = self.coef
        x_next = a * self.x + b * out["eps"].float() + c * self.noise  # c of the last step is 0
        ring_advance(self.write_slot, self.n_past, self.slots, active=self._active[self._filled])
        done = self._filled == S - 1
        final = x_next[S - 1:]
        result = self._decode(final, self._tags[S - 1]) if done else None
        self.x[1:] = x_next[:-1]
        self._filled = min(self._filled + 1, S - 1)
        return result

    def _decode(self, latent: torch.Tensor, tag: Any) -> Output:
        """The final latent -> Output (image (R, R, 3) uint8; depth (R, R) float32 for rgbd layouts)."""
        if latent.device.type != "meta":  # bench.flops counts a session on the meta device
            self.finite.update(latent, "latents")
        if self.latent.groups == 1:
            self.x_dec.copy_(latent)
            img, depth = self.graphs["decoder"]({"latent": self.x_dec})["image"][0], None
        else:
            img, depth = self.latent.decode(self.graphs["decoder"], latent)
        out = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()
        self._mark("decode")
        return Output(out, tag, depth)

    def set_noise(self, init: torch.Tensor, steps: torch.Tensor) -> None:
        """Replace the fixed noise (x_T noise (1, C, h, w), per-step noise (S, C, h, w)), e.g. to match a host
        that reads it from a file. Takes effect at the next set_source (x_T) and the next frame."""
        self.noise_init.copy_(init)
        self.noise.copy_(steps)
