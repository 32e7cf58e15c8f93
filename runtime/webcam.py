"""python -m runtime.webcam: animate a portrait live from a camera, a video file, or pushed frames.

    python -m runtime.webcam                                   # demo: shipped clip as the camera, window
    python -m runtime.webcam --source me.png --camera 0        # your camera (tiny preset, random weights)
    python -m runtime.webcam --input samples/driving.mp4 --output out.mp4 --headless
    python -m runtime.webcam --live-preset sd15 --checkpoint model_state-415001.th --taesd taesd/ \
        --lora lcm-lora-sdv1-5.safetensors --source me.png --camera 0             # the product, on a GPU
    python -m runtime.webcam --depth --relight                  # joint RGB + depth model: RGB | depth, relit

Without --checkpoint the model has seeded random weights: the output is noise, and the console and
the HUD say so. Keys in the window: s = next source, r = reset the temporal cache, h = HUD, q = quit;
with --relight, the arrow keys (or j/l/i/k) move the light. --depth runs the rgbd variant of the model
preset (NAME-rgbd; docs/rgbd.md): an RGB checkpoint must be converted once with python -m models.rgbd
convert. The design is in runtime/live/ (one module per stage) and README "Live runtime".
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from runtime.live.config import BACKENDS, DECODERS, DTYPES, ENCODERS, LIVE_PRESETS, LiveConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SOURCE = ROOT / "samples" / "source.png"
SAMPLE_DRIVING = ROOT / "samples" / "driving.mp4"
VIDEO_EXTS = (".mp4", ".mkv", ".mov", ".avi")
RANDOM_BANNER = ("RANDOM WEIGHTS: no --checkpoint was given, so the output is noise. Real pictures need the "
                 "X-Portrait checkpoint (README: Checkpoints).")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.webcam", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--source", type=Path, action="append",
                    help="source portrait (repeat to swap with the s key); default samples/source.png")
    src = io.add_mutually_exclusive_group()
    src.add_argument("--camera", type=int, metavar="N", help="camera index (cv2.VideoCapture)")
    src.add_argument("--input", type=Path, metavar="FILE", help="a video file played at its own fps as the camera")
    io.add_argument("--loop", action="store_true", help="loop --input")
    io.add_argument("--every-frame", action="store_true",
                    help="process every frame of --input as fast as possible (no drops; not live)")
    io.add_argument("--output", type=Path, metavar="OUT.mp4", help="also write the animated frames (atomically)")
    io.add_argument("--headless", action="store_true", help="no window (servers, tests)")
    io.add_argument("--virtual-cam", action="store_true", help="also send frames to a virtual camera (pyvirtualcam)")
    io.add_argument("--log-json", type=Path, metavar="FILE", help="per-frame latency log, JSON lines")
    io.add_argument("--frames", type=int, metavar="N", help="stop after N output frames")
    io.add_argument("--no-hud", action="store_true", help="start with the HUD hidden")
    m = p.add_argument_group("model")
    m.add_argument("--live-preset", default="tiny", choices=sorted(LIVE_PRESETS),
                   help="named configuration (default tiny: CPU, random weights)")
    m.add_argument("--preset", choices=("tiny", "sd15"), help="model preset (overrides the live preset's)")
    m.add_argument("--checkpoint", type=Path, help="official X-Portrait weights (.th or .safetensors)")
    m.add_argument("--taesd", type=Path, help="TAESD weights: folder with taesd_encoder/decoder.pth, or a file")
    m.add_argument("--lora", type=Path, help="LoRA to fuse, e.g. LCM-LoRA (pytorch_lora_weights.safetensors)")
    m.add_argument("--engines", type=Path, metavar="DIR", help="export folder for --backend ort/trt")
    m.add_argument("--depth", action="store_true", help="the joint RGB + depth (rgbd) variant of the preset: "
                   "shows and writes RGB | depth (near = white) side by side")
    m.add_argument("--relight", action="store_true", help="relight the RGB from the generated depth; move the "
                   "light with the arrow keys or j/l/i/k (needs --depth)")
    s = p.add_argument_group("sampling and speed")
    s.add_argument("--backend", choices=BACKENDS)
    s.add_argument("--device")
    s.add_argument("--dtype", choices=tuple(DTYPES))
    s.add_argument("--resolution", type=int)
    s.add_argument("--sampler", choices=("lcm", "tcd", "ddim"))
    s.add_argument("--steps", type=int, help="denoising steps per frame (1-4)")
    s.add_argument("--window", type=int, help="past frames the motion modules see, 0-15 (default 15)")
    s.add_argument("--stream-batch", action="store_true", help="batch the steps of successive frames "
                   "(more FPS, steps-1 frames more delay)")
    s.add_argument("--ring-dtype", choices=("fp8",), help="store the temporal K/V rings in fp8 (half the memory)")
    s.add_argument("--decoder", choices=DECODERS)
    s.add_argument("--encoder", choices=ENCODERS)
    s.add_argument("--seed", type=int)
    t = p.add_argument_group("face tracking")
    t.add_argument("--detect-every", type=int, default=2, metavar="K", help="run the landmarker every K frames")
    t.add_argument("--reframe", choices=("fixed", "follow"), default="fixed",
                   help="fixed: re-framing set at the first face (like the offline pipeline); follow: every frame")
    p.add_argument("--serve", action="store_true", help="serve the browser page instead (see --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    from runtime.web.config import add_arguments
    add_arguments(p)
    return p


def config_from_args(a: argparse.Namespace) -> LiveConfig:
    over = {k: v for k, v in (("preset", a.preset), ("backend", a.backend), ("device", a.device),
                              ("dtype", a.dtype), ("resolution", a.resolution), ("sampler", a.sampler),
                              ("steps", a.steps), ("window", a.window), ("decoder", a.decoder),
                              ("encoder", a.encoder), ("seed", a.seed), ("ring_dtype", a.ring_dtype)) if v is not None}
    if a.stream_batch:
        over["stream_batch"] = True
    if getattr(a, "relight", False) and not getattr(a, "depth", False):
        raise ValueError("--relight needs --depth (the light is shaded from the generated depth)")
    if getattr(a, "depth", False):  # the rgbd variant of the chosen model preset
        base = over.get("preset") or LIVE_PRESETS[a.live_preset].preset
        over["preset"] = base if base.endswith("-rgbd") else f"{base}-rgbd"
    return LiveConfig.from_name(a.live_preset, **over).validated()


def validate_io(a: argparse.Namespace) -> None:
    """Everything about files, before any model is loaded."""
    for src in a.source or []:
        if not src.is_file():
            raise FileNotFoundError(f"--source {src}: no such file")
    if a.input is not None and not a.input.is_file():
        raise FileNotFoundError(f"--input {a.input}: no such file")
    if a.every_frame and a.input is None and a.camera is not None:
        raise ValueError("--every-frame needs --input FILE (a camera cannot wait)")
    if a.frames is not None and a.frames < 1:
        raise ValueError(f"--frames {a.frames}: must be >= 1")
    if a.detect_every < 1:
        raise ValueError(f"--detect-every {a.detect_every}: must be >= 1")
    inputs = [*(a.source or []), *([a.input] if a.input else [])]
    for flag, path, exts in (("--output", a.output, VIDEO_EXTS), ("--log-json", a.log_json, (".json", ".jsonl"))):
        if path is not None:
            check_output(flag, path, exts, inputs)
            path.parent.mkdir(parents=True, exist_ok=True)  # checked above: it can be made


def check_output(flag: str, path: Path, exts: tuple[str, ...], inputs: list[Path]) -> None:
    try:
        from models.fileio import check_output_path
    except ImportError:  # pragma: no cover - the shared helper is part of the project
        check_output_path = None
    if check_output_path is not None:
        try:
            check_output_path(path, exts, inputs=inputs)
        except (ValueError, OSError) as e:
            raise ValueError(f"{flag} {path}: {e}") from None
        return
    if path.suffix.lower() not in exts:
        raise ValueError(f"{flag} {path}: use one of {', '.join(exts)}")


def prepare_sources(paths: list[Path], size: int, landmarker):
    """Each source image cropped square around its face at the working size, with its landmarks."""
    from runtime.preprocess import prepare_source
    from runtime.video_io import read_image
    out = []
    for path in paths:
        image, lm = prepare_source(read_image(path), size, landmarker)
        out.append((path, image, lm))
    return out


def hud_lines(res, stats, status: str, random_weights: bool, cfg: LiveConfig) -> list[str]:
    lines = [f"{stats['fps']:.1f} FPS  latency {stats['latency_ms']:.0f} ms  dropped {stats['dropped']}",
             "  ".join(f"{k} {v:.1f}" for k, v in res.stages.items() if v >= 0.05),
             f"{cfg.preset} {cfg.backend} {cfg.dtype} {cfg.sampler} x{cfg.steps} window {cfg.window}"
             + (" stream-batch" if cfg.stream_batch else "")]
    if not res.tag.face:
        lines.append("NO FACE: holding the last crop")
    elif status not in ("ok", "starting"):
        lines.append(status)
    if random_weights:
        lines.append("RANDOM WEIGHTS (no --checkpoint)")
    return lines


def run(a: argparse.Namespace) -> int:
    cfg = config_from_args(a)
    validate_io(a)
    if a.serve and a.depth:
        raise ValueError("--depth runs in the window and with --output; the browser page (--serve) shows RGB only")
    if a.serve:
        from runtime.web.server import serve
        return serve(a, cfg)
    from runtime.landmarks import default_landmarker
    from runtime.live.capture import CameraSource, FileSource, open_source
    from runtime.live.factory import load_live
    from runtime.live.metrics import LatencyLog
    from runtime.live.pipeline import Pipeline
    from runtime.live.tracking import FaceTracker
    landmarker = default_landmarker()
    size = cfg.image_size()
    sources = prepare_sources(a.source or [SAMPLE_SOURCE], size, landmarker)
    if a.input is None and a.camera is None:
        a.input, a.loop = SAMPLE_DRIVING, a.loop or not a.headless
        print(f"no --camera or --input: playing {a.input.relative_to(ROOT)} as the camera", file=sys.stderr)
    if a.every_frame:
        source = FileSource(a.input, loop=False, realtime=False)
    elif a.camera is not None:
        source = CameraSource(a.camera)
    else:
        source = open_source(input=a.input, loop=a.loop)
    t0 = time.perf_counter()
    live = load_live(cfg, checkpoint=a.checkpoint, taesd=a.taesd, lora=a.lora, engines=a.engines)
    if live.random_weights:
        print(RANDOM_BANNER, file=sys.stderr)
    session = live.new_session()
    _, image, lm = sources[0]
    import torch
    session.set_source(torch.from_numpy(image))
    tracker = FaceTracker(size, lm, landmarker=landmarker, detect_every=a.detect_every, reframe=a.reframe)
    print(f"ready in {time.perf_counter() - t0:.1f} s: {cfg.preset} on {cfg.device} ({cfg.backend}, {cfg.dtype}), "
          f"{cfg.steps} {cfg.sampler} steps, window {cfg.window}; session state "
          f"{session.memory()['total'] / 2**20:.1f} MiB", file=sys.stderr)
    sinks = _open_sinks(a, source)
    log = LatencyLog(a.log_json)
    view = light = None
    if a.depth:
        from runtime.live.depth import DepthView, LightKeys
        light = LightKeys() if a.relight else None
        view = DepthView(session.device, relight_on=a.relight, light=light.direction() if light else None)
    pipe = Pipeline(session, source, tracker, every_frame=a.every_frame, view=view).start()
    return _present(a, cfg, live, pipe, sinks, log, sources, light)


def _open_sinks(a, source) -> list:
    from runtime.live.present import VideoFileSink, VirtualCamSink, Window
    fps = getattr(source, "fps", None) or 25.0
    sinks = []
    if not a.headless:
        sinks.append(Window())
    if a.output is not None:
        sinks.append(VideoFileSink(a.output, fps))
    if a.virtual_cam:
        sinks.append(VirtualCamSink(fps=fps))
    return sinks


def _until_interrupted(results):
    """Ctrl-C / SIGTERM end a live run like the q key: the recording so far is finished, not thrown away."""
    try:
        yield from results
    except KeyboardInterrupt:
        print("interrupted: finishing the output", file=sys.stderr)


def _present(a, cfg, live, pipe, sinks, log, sources, light=None) -> int:
    """Show/write results until the input ends, q, --frames, or Ctrl-C/SIGTERM (which, like q, finish the
    outputs so far: a live recording is kept, complete and playable). Returns the exit code."""
    interrupted = 0
    try:
        _loop(a, cfg, live, pipe, sinks, log, sources, light)
    except KeyboardInterrupt as e:  # models.cli turns SIGTERM into this too (Interrupted, with .signum)
        interrupted = 128 + int(getattr(e, "signum", 2))
        print("interrupted: finishing the outputs", file=sys.stderr)
    finally:
        ok = log.frames > 0
        pipe.join()
        for s in sinks:
            s.close() if ok else getattr(s, "abort", s.close)()
        log.close() if ok else log.abort()
    if log.frames == 0 and not interrupted:
        raise RuntimeError(f"no frame was animated ({pipe.counters.frames_in} driving frames read, "
                           f"{pipe.counters.no_face} without a face): {pipe.status}")
    if log.frames:
        print(log.format_summary(), file=sys.stderr)
    return interrupted


def _loop(a, cfg, live, pipe, sinks, log, sources, light=None) -> int:
    from collections import deque

    from runtime.live.present import OutputFrame
    show_hud, which, n = not a.no_hud, 0, 0
    recent: deque = deque(maxlen=30)
    for res in pipe.results():
        if res is None:
            continue
        now = time.perf_counter()
        n += 1
        dropped = pipe.hints.dropped + pipe.out.dropped + getattr(pipe.source, "dropped", 0)
        log.record(res.tag.index, res.tag.t_capture, now, res.stages, dropped, res.tag.face)
        recent.append(now)
        fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
        stats = {"fps": fps, "latency_ms": (now - res.tag.t_capture) * 1e3, "dropped": dropped}
        lines = hud_lines(res, stats, pipe.status, live.random_weights, cfg) if show_hud else None
        if lines is not None and light is not None:
            lines.append(light.describe())
        frame = OutputFrame(res.image, res.tag.t_capture, res.tag.index, res.tag.driving, res.tag.face)
        actions = [act for s in sinks for act in (s.write(frame, lines) or [])]
        if "quit" in actions or (a.frames is not None and n >= a.frames):
            break
        if "toggle_hud" in actions:
            show_hud = not show_hud
        if "reset" in actions:
            pipe.reset()
        if light is not None and light.apply(actions):
            pipe.set_light(light.direction())
        if "swap_source" in actions and len(sources) > 1:
            which = (which + 1) % len(sources)
            pipe.swap_source(sources[which][1], sources[which][2])
    return n


def _main(argv=None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.debug else logging.WARNING, format="%(message)s")
    import torch
    try:
        return run(a)
    except torch.cuda.OutOfMemoryError as e:
        raise RuntimeError("the GPU ran out of memory: try --steps 1, a smaller --window, --ring-dtype fp8, "
                           "--dtype fp16, --resolution 384, or close other GPU programs") from e


def main(argv=None) -> int:
    """One-line errors and exit codes of models/cli.py; Ctrl-C/SIGTERM stop the run and finish the output."""
    from models.cli import run_main
    return run_main(_main, argv, expected=(RuntimeError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
