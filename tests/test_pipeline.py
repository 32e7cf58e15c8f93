"""The offline pipeline: the official 2-step DDIM golden run reproduced through runtime.pipeline's
Denoiser / windows / sampler code, and `python -m runtime.animate` end to end on the samples."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime import animate as cli

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def golden(golden_dir):
    from safetensors.torch import load_file

    from models.config import XPortraitConfig
    from models.weights import load_xportrait
    from models.xportrait import XPortrait
    model = XPortrait(XPortraitConfig.from_golden_json(golden_dir / "config.json")).eval()
    load_xportrait(model, golden_dir / "state.safetensors")
    return model, load_file(str(golden_dir / "io.safetensors")), json.loads((golden_dir / "config.json").read_text())


@torch.no_grad()
def test_golden_ddim_run_through_pipeline(golden):
    """T=2 frames in one window (16-frame windows, overlap 4: a 2-frame clip is one window), CFG 5."""
    from models.samplers import DDIM, initial_latent
    from runtime.pipeline import Denoiser, decode_latents, encode_source, sample, schedule
    from runtime.windows import WindowSpec
    model, io, config = golden
    assert config["sampler"]["steps"] == 2 and config["sampler"]["cfg_scale"] == 5.0
    z = encode_source(model, io["source_image"])
    x_T = initial_latent(schedule(model), z, io["ddim_noise"], "official")
    den = Denoiser(model, z, io["context"][:1], io["pose_hint"], io["local_hint"], cfg_scale=5.0)
    sampler = DDIM(schedule(model), 2)
    assert sampler.timesteps.tolist() == config["sampler"]["timesteps"]
    steps = {}

    def on_step(i, x, eps, out):
        steps.update({f"ddim_step{i}.x_in": x, f"ddim_step{i}.eps_cfg": eps, f"ddim_step{i}.x_prev": out.prev})

    final = sample(den, sampler, x_T, WindowSpec(16, 4), on_step=on_step)
    errs = {"ddim_x_T": rel_err(x_T, io["ddim_x_T"]), "ddim_final_latent": rel_err(final, io["ddim_final_latent"])}
    errs.update({k: rel_err(v, io[k]) for k, v in steps.items()})
    errs["decoded_frames"] = rel_err(decode_latents(model, final), io["decoded_frames"].clamp(-1, 1))
    print({k: f"{v:.2e}" for k, v in errs.items()})
    assert len(steps) == 6 and max(errs.values()) < 1e-4, errs


def test_reference_kv_computed_once_per_step(golden):
    from runtime.pipeline import Denoiser
    model, io, _ = golden
    den = Denoiser(model, torch.zeros(1, 4, 16, 16), io["context"][:1], io["pose_hint"], io["local_hint"])
    first = den.reference_kv(501)
    assert den.reference_kv(501) is first and den.reference_kv(1) is not first
    assert den.pose_feat.shape[0] == den.frames == 2


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    """The first 4 sample frames at an unusual rate (12.5 fps): count and fps must survive."""
    from runtime.video_io import read_video, write_video
    if not (SAMPLES / "driving.mp4").is_file():
        pytest.skip("samples/driving.mp4 missing (python -m scripts.make_samples)")
    path = tmp_path_factory.mktemp("clip") / "short.mp4"
    write_video(path, read_video(SAMPLES / "driving.mp4").frames[:4], 12.5)
    return path


def test_animate_cli_keeps_frame_count_and_fps(short_clip, tmp_path):
    from runtime.video_io import read_video
    out = tmp_path / "anim.mp4"
    summary = cli.run(cli.parse_args(["--driving", str(short_clip), "--out", str(out), "--steps", "1"]),
                      log=lambda *_: None)
    anim, preview = read_video(out), read_video(tmp_path / "anim_preview.mp4")
    assert summary["frames"] == len(anim.frames) == len(preview.frames) == 4
    assert abs(anim.fps - 12.5) < 1e-3 and abs(preview.fps - 12.5) < 1e-3
    assert anim.frames.shape[1:] == (128, 128, 3) and preview.frames.shape[1:] == (128, 384, 3)
    band = anim.frames[:, -12:].astype(np.int32)  # random weights: a caption band is burned in
    assert band.max() > 200


def test_animate_cli_errors_are_one_line(tmp_path, capsys):
    from runtime.video_io import write_image, write_video
    assert cli.main(["--source", str(tmp_path / "nope.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.png" in err and err.count("\n") == 1
    blank, flat = tmp_path / "blank.png", tmp_path / "flat.mp4"
    write_image(blank, np.full((128, 128, 3), 127, np.uint8))
    write_video(flat, [np.full((64, 64, 3), 90, np.uint8)] * 2, 10)
    assert cli.main(["--source", str(blank), "--driving", str(flat)]) == 2
    err = capsys.readouterr().err
    assert "no face" in err and err.count("\n") == 1
    assert cli.main(["--resolution", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().err


def test_animate_cli_rejects_wrong_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file
    if not (SAMPLES / "driving.mp4").is_file():
        pytest.skip("samples/driving.mp4 missing")
    bad = tmp_path / "sd_like.safetensors"
    save_file({"model.diffusion_model.foo.weight": torch.zeros(2)}, str(bad))
    assert cli.main(["--checkpoint", str(bad), "--preset", "tiny", "--max-frames", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not match the model" in err and err.count("\n") == 1


def test_load_models_from_checkpoint_fills_every_tensor(tmp_path):
    """The checkpoint path builds on the meta device, checks keys, then loads strictly: every
    tensor (incl. schedule buffers and CLIP) must equal the file's."""
    from safetensors.torch import save_file

    from models.config import XPortraitConfig
    from models.init import init_random_
    from models.xportrait import XPortrait
    from runtime.pipeline import load_models
    ref = init_random_(XPortrait(XPortraitConfig.from_name("tiny"), with_text_encoder=True), 3).eval()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    got = load_models("tiny", checkpoint=path)
    assert not got.random_weights
    sd = ref.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in got.model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(got.context, ref.cond_stage_model.transformer.empty_context())
