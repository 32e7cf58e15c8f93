"""One ExportSpec per graph (spec §9.4 split), and the model source the graphs are built from.

| graph | runs | what |
|---|---|---|
| vae_encoder / taesd_encoder | per source | source image -> scaled latent (KL posterior mean; TAESD option) |
| reference | per source and timestep | reference net + main-UNet attn1 K/V projection -> 16 K_ref + 16 V_ref |
| hint | per frame | pose + local ControlNet hint encoders |
| control | per frame and step | pose + local ControlNet bodies, 13 summed residuals |
| unet / unet_uncond | per frame and step | full-window main UNet, T frames (cond / official uncond branch) |
| unet_stream / unet_stream_uncond | per frame and step | one new frame per stream + temporal ring caches |
| taesd_decoder / vae_decoder | per frame | latent -> image (TAESD default; full KL VAE option) |

Tensor names are shared across graphs: an output feeds the input of the same name (reference's
ref_k_00 -> unet's ref_k_00, control's ctrl_00 -> unet's ctrl_00, hint's pose_feat -> control's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from export.spec import ExportSpec, TensorDesc, normal, timestep
from export.wrappers import Control, Decode, Encode, Hint, Reference, UNet, UNetStream
from models.config import XPortraitConfig
from models.streaming import motion_layout
from models.xportrait import XPortrait

DEFAULT_MODULES = ("vae_encoder", "reference", "hint", "control", "unet", "unet_uncond", "unet_stream",
                   "unet_stream_uncond", "taesd_decoder")
PARTS = {"unet": "model.diffusion_model", "refnet": "appearance_control_model", "pose": "pose_control_model",
         "local": "local_pose_control_model", "vae": "first_stage_model"}


# ------------------------------------------------------------------------------- sample inputs
def image(shape, g, dims):
    return torch.rand(shape, generator=g) * 2 - 1


def _counters(dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element (write_slot, n_past) samples: element e writes slot (L/2 + e) mod L and has
    max(L - 1 - e, 0) past frames, so elements differ (element 0 reads every slot but its own)."""
    e = torch.arange(dims["B"], dtype=torch.int32)
    return (dims["L"] // 2 + e) % dims["L"], (dims["L"] - 1 - e).clamp(min=0)


def write_slot(shape, g, dims):
    return _counters(dims)[0].reshape(shape)


def n_past(shape, g, dims):
    return _counters(dims)[1].reshape(shape)


def ring(shape, g, dims):
    """Raw K/V ring (L, B*H_l*W_l, C); NaN in every slot an element must not read (its write slot and
    those older than its n_past)."""
    x = torch.randn(shape, generator=g)
    L, rows = dims["L"], shape[1] // dims["B"]
    for e, (ws, n) in enumerate(zip(*(c.tolist() for c in _counters(dims)))):
        for slot in range(L):
            if not 1 <= (ws - slot) % L <= n:
                x[slot, e * rows:(e + 1) * rows] = float("nan")
    return x


# ---------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """Per-layer (downsampling factor, channels) of the tensors that cross graph boundaries."""
    ref: tuple[tuple[int, int], ...]      # 16 attn1 layers: K_ref/V_ref are (1, h*w/ds^2, C)
    control: tuple[tuple[int, int], ...]  # 13 residuals: (B, C, h/ds, w/ds)
    motion: tuple[tuple[int, int], ...]   # 40 motion-attention layers: caches (L, B*h*w/ds^2, C)

    @classmethod
    def of(cls, cfg: XPortraitConfig) -> "Geometry":
        """Shapes from a forward pass on the meta device (no memory, no compute)."""
        n = 64  # probe latent size
        with torch.device("meta"):
            m = XPortrait(cfg)
            x, t = torch.zeros(1, cfg.unet.in_channels, n, n), torch.zeros(1)
            ctx = torch.zeros(1, 77, cfg.unet.context_dim)
            bank = m.appearance_control_model(x, t, ctx)
            feat = torch.zeros(1, cfg.unet.model_channels, n, n)
            ctrl = m.pose_control_model(x, t, ctx, feat)
            motion = motion_layout(m.unet, n, n)
        tokens = lambda k: math.isqrt(n * n // k)  # noqa: E731
        return cls(tuple((tokens(b.shape[1]), b.shape[2]) for b in bank),
                   tuple((n // r.shape[2], r.shape[1]) for r in ctrl),
                   tuple((tokens(k), c) for k, c in motion))


def _hw(ds: int) -> tuple[str, str]:
    return ("h", "w") if ds == 1 else (f"h/{ds}", f"w/{ds}")


def _tokens(ds: int, batch: str | None = None) -> str:
    base = "h*w" if ds == 1 else f"h*w/{ds * ds}"
    return f"{batch}*{base}" if batch else base


# --------------------------------------------------------------------------------------- specs
def build_specs(cfg: XPortraitConfig) -> dict[str, ExportSpec]:
    """All graphs for one model config, by name."""
    g = Geometry.of(cfg)
    u = cfg.unet
    lat = lambda name, n: TensorDesc(name, (n, u.in_channels, "h", "w"), sample=normal)  # noqa: E731
    img = lambda name, n: TensorDesc(name, (n, 3, "8*h", "8*w"), sample=image)  # noqa: E731
    t = lambda n: TensorDesc("t", (n,), "float32", timestep)  # noqa: E731
    ctx = TensorDesc("context", (1, 77, u.context_dim), sample=normal)
    refs = lambda n: tuple(TensorDesc(f"ref_{kv}_{i:02d}", (n, _tokens(ds), c), sample=normal)  # noqa: E731
                           for i, (ds, c) in enumerate(g.ref) for kv in "kv")
    ref = refs(1)  # one source shared by the window; unet_stream takes one per element (batch B)
    ctrl = lambda n: tuple(TensorDesc(f"ctrl_{i:02d}", (n, c, *_hw(ds)), sample=normal)  # noqa: E731
                           for i, (ds, c) in enumerate(g.control))
    feat = lambda name: TensorDesc(name, ("B", u.model_channels, "h", "w"), sample=normal)  # noqa: E731
    ring_in = (TensorDesc("write_slot", ("B",), "int32", write_slot), TensorDesc("n_past", ("B",), "int32", n_past),
               *(TensorDesc(f"{kv}_cache_{i:02d}", ("L", _tokens(ds, "B"), c), sample=ring)
                 for i, (ds, c) in enumerate(g.motion) for kv in "kv"))
    ring_out = tuple(TensorDesc(f"{kv}_new_{i:02d}", (_tokens(ds, "B"), c))
                     for i, (ds, c) in enumerate(g.motion) for kv in "kv")
    n_ref, n_ctrl = len(g.ref), len(g.control)
    # main-UNet latent x / eps: every modality group of the layout (models/rgbd.py); rgbd: t (n, G), one
    # per modality. control keeps lat/t: the host feeds it the rgb group of x and the rgb timestep
    xlat = lambda name, n: TensorDesc(name, (n, u.main_in_channels, "h", "w"), sample=normal)  # noqa: E731
    g_mod = len(u.modalities)
    tm = lambda n: t(n) if g_mod == 1 else TensorDesc("t", (n, g_mod), "float32", timestep)  # noqa: E731
    unet_io = lambda cond, n, r=ref: (xlat("x", n), tm(n), ctx, *((*r, *ctrl(n)) if cond else ()))  # noqa: E731
    ae_note = "KL VAE kept fp32 in the fp16 set: SD VAEs can overflow in fp16 (depth-lcm-taesd.md §4)"

    specs = [
        ExportSpec("vae_encoder", "per_source", lambda s, o: Encode(s.get("vae")), (img("image", 1),),
                   (lat("latent", 1),), ("h", "w"), fp16=False, needs=("vae",),
                   doc=f"source image -> latent = 0.18215 * posterior mean. {ae_note}"),
        ExportSpec("taesd_encoder", "per_source", lambda s, o: Encode(s.get("taesd")), (img("image", 1),),
                   (lat("latent", 1),), ("h", "w"), needs=("taesd",), doc="source image -> TAESD latent"),
        ExportSpec("reference", "per_source_step", lambda s, o: Reference(s.get("refnet"), s.get("unet")),
                   (lat("ref_latent", 1), t(1), ctx), ref, ("h", "w"), needs=("refnet", "unet"),
                   doc="reference net at timestep t on the clean source latent, projected with the main "
                       "UNet's attn1 W_k/W_v: cache the 32 outputs per (source, timestep)"),
        ExportSpec("hint", "per_frame", lambda s, o: Hint(s.get("pose"), s.get("local")),
                   (img("pose_hint", "B"), img("local_hint", "B")), (feat("pose_feat"), feat("local_feat")),
                   needs=("pose", "local"), doc="both ControlNet hint encoders; step-invariant, cache per frame"),
        ExportSpec("control", "per_frame_step", lambda s, o: Control(s.get("pose"), s.get("local")),
                   (lat("x", "B"), t("B"), ctx, feat("pose_feat"), feat("local_feat")), ctrl("B"),
                   needs=("pose", "local"), doc="pose + local ControlNet bodies, 13 residuals summed"),
        ExportSpec("unet", "per_frame_step", lambda s, o: UNet(s.get("unet"), True, n_ref, n_ctrl),
                   unet_io(True, "T"), (xlat("eps", "T"),), ("h", "w"), needs=("unet",),
                   doc="full-window main UNet, conditional: T frames = one temporal window, no cache"),
        ExportSpec("unet_uncond", "per_frame_step", lambda s, o: UNet(s.get("unet"), False), unet_io(False, "T"),
                   (xlat("eps", "T"),), ("h", "w"), needs=("unet",),
                   doc="full-window main UNet, official unconditional branch (no reference, no control)"),
        ExportSpec("unet_stream", "per_frame_step", lambda s, o: UNetStream(s.get("unet"), True, n_ref, n_ctrl),
                   (*unet_io(True, "B", refs("B")), *ring_in), (xlat("eps", "B"), *ring_out), needs=("unet",),
                   doc="streaming main UNet, conditional: one new frame per stream, causal temporal K/V ring"),
        ExportSpec("unet_stream_uncond", "per_frame_step", lambda s, o: UNetStream(s.get("unet"), False),
                   (*unet_io(False, "B"), *ring_in), (xlat("eps", "B"), *ring_out), needs=("unet",),
                   doc="streaming main UNet, unconditional branch (its own ring caches)"),
        ExportSpec("taesd_decoder", "per_frame", lambda s, o: Decode(s.get("taesd")), (lat("latent", "B"),),
                   (img("image", "B"),), needs=("taesd",), doc="latent -> image with TAESD (default decoder)"),
        ExportSpec("vae_decoder", "per_frame", lambda s, o: Decode(s.get("vae")), (lat("latent", "B"),),
                   (img("image", "B"),), fp16=False, needs=("vae",), doc=f"latent -> image, KL VAE. {ae_note}"),
    ]
    return {s.name: s for s in specs}


# -------------------------------------------------------------------------------- model source
class ModelSource:
    """The model the graphs are cut from: weights, CLIP("") context, and part-wise memory release.

    No checkpoint: seeded random weights exactly as the runtime makes them (models.init on the whole
    XPortrait with CLIP; TAESD with seed + 1). With a checkpoint: keys are checked on a meta-device
    model (a wrong file fails before anything is allocated), tensors are memory-mapped where the
    format allows, and each part is materialised on first use and can be released after its last
    graph, so the sd15 export never holds all 3 B parameters plus an export in memory at once.
    """

    def __init__(self, cfg: XPortraitConfig, checkpoint: str | Path | None = None, taesd: str | Path | None = None,
                 lora: str | Path | None = None, lora_scale: float = 1.0, context: str | Path | None = None,
                 seed: int = 0):
        from models.init import init_random_
        self.cfg, self.random = cfg, checkpoint is None
        self.notes: list[str] = []
        self._taesd_path, self._lora, self._lora_scale, self._seed = taesd, lora, lora_scale, seed
        self._parts: dict[str, nn.Module] = {}
        self._sd: dict | None = None
        if self.random:
            if lora is not None:
                raise ValueError("--lora needs --checkpoint (LoRA is fused into real X-Portrait weights)")
            self.model = init_random_(XPortrait(cfg, with_text_encoder=True), seed).eval()
            self.notes.append(f"random weights (preset {cfg.name}, seed {seed}), as the runtime makes them")
            self._ready = set(PARTS)
        else:
            self.model, self._sd = _meta_checked(cfg, checkpoint, need_clip=context is None)
            self._ready = set()
        self.context = _load_context(context) if context is not None else self._clip_context()
        if self.context.shape != (1, 77, cfg.unet.context_dim):
            raise ValueError(f"context has shape {tuple(self.context.shape)}, expected (1, 77, {cfg.unet.context_dim})")

    def _clip_context(self) -> torch.Tensor:
        clip = self.model.cond_stage_model.transformer
        if not self.random:
            clip.to_empty(device="cpu")
            _load_prefix(clip, self._sd, "cond_stage_model.transformer.")
        ctx = clip.empty_context()
        del self.model.cond_stage_model
        return ctx

    def get(self, part: str) -> nn.Module:
        if part == "taesd":
            if "taesd" not in self._parts:
                self._parts["taesd"] = self._taesd()
            return self._parts["taesd"]
        net = self.model.get_submodule(PARTS[part])
        if part not in self._ready:
            if self.random:
                raise RuntimeError(f"{part} was released; random weights are made once for the whole model")
            net.to_empty(device="cpu")
            _load_prefix(net, self._sd, PARTS[part] + ".")
            if part == "unet" and self._lora is not None:
                from models.lora import fuse_lora
                n = fuse_lora({"unet": net}, self._lora, self._lora_scale)["unet"]
                self.notes.append(f"LoRA {self._lora} fused into {n} main-UNet layers (scale {self._lora_scale})")
            self._ready.add(part)
        return net.eval()

    def release(self, part: str) -> None:
        """Free a part's weights after its last graph (a checkpoint part is reloaded if asked for again)."""
        if part == "taesd":
            self._parts.pop("taesd", None)
        elif part in self._ready:
            self.model.get_submodule(PARTS[part]).to("meta")
            self._ready.discard(part)

    def _taesd(self) -> nn.Module:
        from models.init import init_random_
        from models.taesd import TAESD
        from models.weights import load_taesd
        taesd = TAESD(self.cfg.taesd).eval()
        path = self._taesd_path
        if path is None:
            if not self.random:
                raise ValueError("TAESD graphs need TAESD weights with a real checkpoint: pass --taesd DIR "
                                 "(taesd_encoder.pth + taesd_decoder.pth) or --taesd FILE (diffusers "
                                 "AutoencoderTiny), or export vae_decoder instead (--modules ... vae_decoder)")
            return init_random_(taesd, self._seed + 1)
        path = Path(path)
        if path.is_dir():
            pick = {w: next((path / f"taesd_{w}{e}" for e in (".safetensors", ".pth")
                             if (path / f"taesd_{w}{e}").is_file()), None) for w in ("encoder", "decoder")}
            if None in pick.values():
                raise FileNotFoundError(f"{path} lacks taesd_encoder/taesd_decoder (.pth or .safetensors)")
            load_taesd(taesd, encoder=pick["encoder"], decoder=pick["decoder"])
        else:
            load_taesd(taesd, diffusers=path)
        return taesd


def _lazy_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: memory-mapped for zip-format torch files (weights_only=True); a
    safetensors file is read into memory once."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        from models.weights import read_state_dict
        return read_state_dict(path)
    return obj["state_dict"] if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else obj


def _meta_checked(cfg: XPortraitConfig, checkpoint, need_clip: bool) -> tuple[XPortrait, dict]:
    from models.weights import meta_checked
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    sd = _lazy_state_dict(path)
    return meta_checked(cfg, sd, require_text_encoder=need_clip), sd


def _load_prefix(net: nn.Module, sd: dict, prefix: str) -> None:
    part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not part and prefix.startswith("cond_stage_model."):
        raise ValueError("the checkpoint has no CLIP weights: pass --context FILE, a (1, 77, C) CLIP(\"\") tensor")
    net.load_state_dict(part, strict=True)  # keys were checked against the whole model already


def _load_context(path: str | Path) -> torch.Tensor:
    """The (1, 77, C) context from .safetensors (key 'context') or a torch file holding a tensor.
    A batch of identical rows (as stored by golden sets) is reduced to one."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            if "context" not in f.keys():
                raise KeyError(f"{path} has no 'context' tensor")
            ctx = f.get_tensor("context")
    else:
        ctx = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ctx, torch.Tensor) or ctx.dim() != 3 or not torch.equal(ctx, ctx[:1].expand_as(ctx)):
        raise ValueError(f"{path}: context must be a (1, 77, C) tensor (or identical rows)")
    return ctx[:1].float()


# ----------------------------------------------------------------------------- manifest caches
def manifest_caches(specs: dict[str, ExportSpec], chosen: list[str], opts) -> dict:
    """The manifest's `caches` block: what the host keeps between calls, its layout and lifetime."""
    def names(spec: str, prefix: str, io: str = "outputs") -> list[str]:
        return [t.name for t in getattr(specs[spec], io) if t.name.startswith(prefix)]

    users = lambda *ns: [n for n in ns if n in chosen]  # noqa: E731
    out = {
        "context": {"file": "context.safetensors", "key": "context",
                    "shape": list(specs["reference"].inputs[2].shape),
                    "dtype": "float32", "scope": "constant (CLIP(\"\")); cast to the dtype of each graph's "
                                                 "`context` input",
                    "consumers": users(*(n for n, sp in specs.items() if any(t.name == "context" for t in sp.inputs)))},
        "reference_kv": {"producer": "reference", "consumers": users("unet", "unet_stream"),
                         "tensors": names("reference", "ref_"),
                         "scope": "per source and sampler timestep: run `reference` with t = each of "
                                  "sampler.timesteps once per source, keep one set per step index"},
        "hint_features": {"producer": "hint", "consumers": users("control"), "tensors": names("hint", ""),
                          "scope": "per driving frame, shared by all steps"},
        "control_residuals": {"producer": "control", "consumers": users("unet", "unet_stream"),
                              "tensors": names("control", "ctrl_"), "scope": "per frame and step (not cached)"},
    }
    stream = [n for n in ("unet_stream", "unet_stream_uncond") if n in chosen]
    if stream:
        s = specs["unet_stream"]
        out["temporal_kv"] = {
            "producer": stream, "slots": opts.slots, "layers": len(names("unet_stream", "k_new_")),
            "inputs": names("unet_stream", "k_cache_", "inputs") + names("unet_stream", "v_cache_", "inputs"),
            "outputs": names("unet_stream", "k_new_") + names("unet_stream", "v_new_"),
            "elements": "the batch B of a call: ring owners, one (stream, sampler step index) pair each, per "
                        "CFG branch; elements of one call may be at different steps (t is (B,)) and have their "
                        "own ref_k/ref_v rows (batch B)",
            "layout": "per layer (L, B*H_l*W_l, C_l), raw W_k·h / W_v·h without positional terms; "
                      "row = element * H_l*W_l + y * W_l + x; the graph adds W_k·pe / W_v·pe (constants)",
            "window": "past frames each motion layer sees = L - 1 (0..15, trained 15); frame j steps back of "
                      "element e is in slot (write_slot[e] - j) mod L at position n_past[e] - j, the new "
                      "frame at position n_past[e]",
            "counters": "write_slot, n_past: int32 (B,), one pair per element, advanced independently",
            "init": "element e starts (or restarts) a stream with write_slot[e] = 0, n_past[e] = 0 "
                    "(ring contents are never read before being written)",
            "after_call": "copy rows e*H_l*W_l..(e+1)*H_l*W_l of k_new_i / v_new_i into slot write_slot[e] "
                          "of the same rows of k_cache_i / v_cache_i, for every element e",
            "after_frame": "for each element that took a frame: write_slot[e] = (write_slot[e] + 1) % L; "
                           "n_past[e] = min(n_past[e] + 1, L - 1)",
            "scope": "one ring set per element: per stream, sampler step index and CFG branch "
                     "(unet_stream_uncond keeps its own)",
            "elements_per_set": sum(2 * s.shape(t, opts)[0] * s.shape(t, opts)[1] * s.shape(t, opts)[2]
                                 for t in s.inputs if t.name.startswith("k_cache_")),
        }
    return out


# ------------------------------------------------------------------ manifest sampler and pipeline
DEFAULT_CFG_SCALE = {"ddim": 5.0, "lcm": 1.0, "tcd": 1.0}  # as runtime/pipeline.py DEFAULT_CFG


def manifest_sampler_maths(cfg: XPortraitConfig, name: str, steps: int) -> dict:
    """The sampler block's host-facing maths (schema 2): per-step affine update, x_T, CFG.

    Every sampler of models/samplers.py steps as x_next = x[i]*x + eps[i]*eps + noise[i]*noise_i
    (DDIM, LCM and TCD are linear with no constant term), so the three coefficients are read off
    the sampler itself by stepping with unit inputs in float64: a host cannot drift from Python.
    """
    from models.samplers import make_sampler
    from models.schedule import ddpm_buffers, q_sample
    ac = ddpm_buffers(cfg.schedule)["alphas_cumprod"]
    s = make_sampler(name, ac, steps)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    coef = {"x": [], "eps": [], "noise": []}
    for i in range(len(s)):
        noisy = s.needs_noise(i)
        coef["x"].append(float(s.step(zero, i, one, zero if noisy else None).prev))
        coef["eps"].append(float(s.step(one, i, zero, zero if noisy else None).prev))
        coef["noise"].append(float(s.step(zero, i, zero, one).prev) if noisy else 0.0)
    t_init = ac.shape[0] - 1
    return {
        "step": {**coef, "rule": "x_next = x[i] * x + eps[i] * eps + noise[i] * noise_step[i] (noise_step[i] "
                                 "only where noise[i] != 0; the sampler state x is float32)"},
        "init": {"default": "official",
                 "official": {"timestep": t_init, "latent": float(q_sample(ac, one, t_init, zero)),
                              "noise": float(q_sample(ac, zero, t_init, one))},
                 "noise": {"latent": 0.0, "noise": 1.0},
                 "rule": "x_T = latent * z_src + noise * noise_init (z_src: the encoder's latent)"},
        "cfg": {"scale": DEFAULT_CFG_SCALE[name],
                "rule": "eps = eps_uncond + scale * (eps_cond - eps_uncond); scale 1: eps = eps_cond and the "
                        "unconditional graph is not run"},
        "noise_file": {"format": "safetensors", "tensors": {"init": "(1, 4, h, w) float32",
                                                            "step": "(S, 4, h, w) float32, S = steps"},
                       "rule": "both fixed per session: every frame uses the same noise_init and noise_step[i]"},
    }


def manifest_pipeline(specs: dict[str, ExportSpec], chosen: list[str], opts) -> dict:
    """The manifest's `pipeline` block (schema 2): the streaming protocol as ordered stages.

    Stage values name session state: `host.*` comes from the caller, `context` from the context
    file, `sampler.*` from the sampler block, `ref[i]`/`ring[i].<branch>` are kept per step index i;
    a `*` stands for every tensor of that prefix. Docs: docs/host.md (the C++ host follows it).
    """
    pick = lambda *ns: next((n for n in ns if n in chosen), None)  # noqa: E731
    graphs = {"encoder": pick("vae_encoder", "taesd_encoder"), "reference": pick("reference"),
              "hint": pick("hint"), "control": pick("control"), "unet": pick("unet_stream"),
              "unet_uncond": pick("unet_stream_uncond"), "decoder": pick("taesd_decoder", "vae_decoder")}
    h, w = opts.latent_hw
    t = "sampler.timesteps[i]"

    def unet(branch: str, cond: bool) -> dict:
        ins = {"x": "x", "t": t, "context": "context",
               **({"ref_*": "ref[i].ref_*", "ctrl_*": "ctrl_*"} if cond else {}),
               "write_slot": f"ring[i].{branch}.write_slot", "n_past": f"ring[i].{branch}.n_past",
               "k_cache_*": f"ring[i].{branch}.k_cache_*", "v_cache_*": f"ring[i].{branch}.v_cache_*"}
        return {"at": "frame_step", "graph": "unet" if cond else "unet_uncond", "inputs": ins,
                "outputs": {"eps": f"eps_{branch}", "k_new_*": f"ring[i].{branch}.k_new_*",
                            "v_new_*": f"ring[i].{branch}.v_new_*"},
                **({} if cond else {"when": "sampler.cfg.scale != 1"})}
    stages = [
        {"at": "source", "graph": "encoder", "inputs": {"image": "host.source"}, "outputs": {"latent": "z_src"}},
        {"at": "source_step", "graph": "reference", "inputs": {"ref_latent": "z_src", "t": t, "context": "context"},
         "outputs": {"ref_*": "ref[i].ref_*"}},
        {"at": "source", "op": "init", "rule": "x_T = sampler.init.latent * z_src + sampler.init.noise * noise_init; "
                                               "constant per source with fixed noise"},
        {"at": "frame", "graph": "hint", "inputs": {"pose_hint": "host.pose_hint", "local_hint": "host.local_hint"},
         "outputs": {"pose_feat": "pose_feat", "local_feat": "local_feat"}},
        {"at": "frame", "op": "start", "rule": "x = x_T"},
        {"at": "frame_step", "graph": "control",
         "inputs": {"x": "x", "t": t, "context": "context", "pose_feat": "pose_feat", "local_feat": "local_feat"},
         "outputs": {"ctrl_*": "ctrl_*"}},
        unet("cond", True), unet("uncond", False),
        {"at": "frame_step", "op": "ring_write",
         "rule": "for each branch run and each layer l, element e: rows [e*R_l, (e+1)*R_l) of k_new_l/v_new_l go to "
                 "rows [e*R_l, (e+1)*R_l) of slot write_slot[e] of k_cache_l/v_cache_l (R_l = H_l*W_l = rows / B)"},
        {"at": "frame_step", "op": "cfg", "rule": "sampler.cfg.rule"},
        {"at": "frame_step", "op": "sampler_step", "rule": "sampler.step.rule"},
        {"at": "frame", "op": "ring_advance",
         "rule": "every ring of every step and branch: write_slot = (write_slot + 1) % L; "
                 "n_past = min(n_past + 1, L - 1); L = dim 0 of k_cache_*"},
        {"at": "frame", "graph": "decoder", "inputs": {"latent": "x"}, "outputs": {"image": "host.output"}},
    ]
    return {
        "protocol": "xportrait-stream/1",
        "graphs": graphs,
        "stages": [s for s in stages if s.get("graph") is None or graphs[s["graph"]] is not None],
        "state": {"x": f"float32 (B, 4, {h}, {w}), cast to the dtype of each graph's `x`/`latent` input",
                  "ring": "one set of caches per step index i and branch (cond, uncond), zero-filled; counters "
                          "write_slot = 0, n_past = 0 at session start (and reset), int32, one per element",
                  "casts": "a tensor kept in one dtype and fed to an input of another is converted (fp32 <-> fp16)",
                  "batch": "a kept tensor with batch 1 feeding an input with batch B is repeated B times"},
        "images": {"layout": "NCHW, RGB, float", "size": [8 * h, 8 * w], "range": [-1.0, 1.0],
                   "from_uint8": "v = u8 / 127.5 - 1", "to_uint8": "u8 = round((clamp(v, -1, 1) + 1) * 127.5)",
                   "inputs": {"host.source": "the source portrait, a square crop around the face",
                              "host.pose_hint": "the driving frame re-framed onto the source face",
                              "host.local_hint": "-1 canvas with the (H/4 x W/4) patches of host.pose_hint centred "
                                                 "on the left eye, right eye and mouth, pasted in that order, centres "
                                                 "clipped to [H/8, H - H/8]"},
                   "outputs": {"host.output": "decoder image clamped to [-1, 1]"}},
    }
