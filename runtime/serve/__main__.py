"""python -m runtime.serve: the browser page served by Ray Serve, sessions spread over model replicas.

    python -m runtime.serve                                        # local Ray, 2 CPU replicas, tiny preset
    python -m runtime.serve --steps 1 --window 3 --replicas 3 --sessions-per-replica 2
    python -m runtime.serve --serve-preset gpu --live-preset sd15 --checkpoint model_state-415001.th \\
        --taesd taesd/ --lora lcm-lora-sdv1-5.safetensors        # one replica per GPU, autoscaled
    python -m runtime.serve --config deploy.yaml                   # sections serve/live/web/model (docs/serve.md)
    python -m runtime.serve --config deploy.yaml --print-config > app.yaml && serve deploy app.yaml

Flags override the file. Open the printed URL; each tab is a session on one replica.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from runtime.serve.config import SERVE_PRESETS, check_spec, load_file

# flag -> (section, key)
_MAP = {
    "serve_preset": ("serve", "preset"), "address": ("serve", "address"), "host": ("serve", "host"),
    "port": ("serve", "port"), "num_cpus": ("serve", "num_cpus"), "replicas": ("serve", "replicas"),
    "min_replicas": ("serve", "min_replicas"), "max_replicas": ("serve", "max_replicas"),
    "target_sessions": ("serve", "target_sessions"), "replica_gpus": ("serve", "replica_gpus"),
    "replica_cpus": ("serve", "replica_cpus"), "ingress_replicas": ("serve", "ingress_replicas"),
    "memory_reserve_mib": ("serve", "memory_reserve_mib"), "session_mib": ("serve", "session_mib"),
    "sessions_per_replica": ("web", "max_sessions"), "idle_timeout": ("web", "idle_timeout"),
    "token": ("web", "token"), "max_rate": ("web", "max_rate"), "allow_origins": ("web", "allow_origins"),
    "live_preset": ("live", "preset_name"), "preset": ("live", "preset"), "device": ("live", "device"),
    "backend": ("live", "backend"), "dtype": ("live", "dtype"), "steps": ("live", "steps"),
    "window": ("live", "window"), "sampler": ("live", "sampler"), "resolution": ("live", "resolution"),
    "checkpoint": ("model", "checkpoint"), "taesd": ("model", "taesd"), "lora": ("model", "lora"),
    "engines": ("model", "engines"), "source": ("model", "source"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", metavar="FILE", help="deployment file (.yaml/.json: sections serve, live, web, model)")
    p.add_argument("--print-config", action="store_true", help="print the app as a `serve deploy` file and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks and Serve's logs")
    s = p.add_argument_group("cluster and scaling")
    s.add_argument("--serve-preset", choices=tuple(SERVE_PRESETS), help="local (default), gpu, cluster")
    s.add_argument("--address", help="join this Ray cluster ('auto' after `ray start --head`); default: start one")
    s.add_argument("--host", help="Serve's HTTP proxy address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="Serve's HTTP port (default 8000)")
    s.add_argument("--num-cpus", type=int, help="logical CPUs of a Ray started here")
    s.add_argument("--replicas", type=int, help="fixed number of model replicas (default 2)")
    s.add_argument("--autoscale", action="store_true", help="autoscale between --min-replicas and --max-replicas")
    s.add_argument("--min-replicas", type=int)
    s.add_argument("--max-replicas", type=int)
    s.add_argument("--target-sessions", type=float, help="autoscaling target: sessions per replica")
    s.add_argument("--sessions-per-replica", type=int, help="hard cap; one more session goes elsewhere or is busy")
    s.add_argument("--replica-gpus", type=float, help="GPUs per replica (1 = one replica per GPU)")
    s.add_argument("--replica-cpus", type=float, help="CPUs per replica (also torch threads on CPU)")
    s.add_argument("--ingress-replicas", type=int, help="WebSocket relay replicas")
    s.add_argument("--memory-reserve-mib", type=float, help="GPU memory a replica keeps free (default 1024)")
    s.add_argument("--session-mib", type=float, help="memory of one session, if known")
    s.add_argument("--idle-timeout", type=float, help="free a session idle this many seconds (default 60)")
    w = p.add_argument_group("page")
    w.add_argument("--token", help="require ?token=TOKEN (use with a non-loopback --host)")
    w.add_argument("--max-rate", type=float, help="messages per second per page")
    w.add_argument("--allow-origin", dest="allow_origins", action="append", metavar="ORIGIN")
    m = p.add_argument_group("model (as python -m runtime.webcam)")
    m.add_argument("--live-preset", help="tiny (default), sd15, sd15-quality, sd15-throughput")
    m.add_argument("--preset", choices=("tiny", "sd15"))
    for flag in ("--checkpoint", "--taesd", "--lora", "--engines", "--source", "--device", "--backend", "--dtype",
                 "--sampler"):
        m.add_argument(flag)
    for flag in ("--steps", "--window", "--resolution"):
        m.add_argument(flag, type=int)
    return p


def spec_from_args(a: argparse.Namespace) -> dict:
    """The deployment dict: the --config file, then every flag given on top of it."""
    spec = load_file(a.config) if a.config else {}
    if a.autoscale:
        spec.setdefault("serve", {})["replicas"] = None
    for dest, (section, key) in _MAP.items():
        value = getattr(a, dest, None)
        if value is not None:
            spec.setdefault(section, {})[key] = list(value) if isinstance(value, list) else value
    return check_spec(spec, "the command line")


def _main(argv=None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.debug else logging.WARNING, format="%(message)s")
    spec = spec_from_args(a)  # the flags and the --config file, checked before Ray starts
    from runtime.serve.config import resolve
    cfg, _live, web, _model = resolve(spec)
    if a.print_config:
        from runtime.serve.app import deploy_yaml
        print(deploy_yaml(spec), end="")
        return 0
    for line in web.bind_warnings():
        print(f"warning: {line}", file=sys.stderr)
    from runtime.serve.app import start, stop
    url = start(spec)
    print(f"serving on {url}  (Ctrl-C to stop)", file=sys.stderr, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stop(cfg)
    return 0


def main(argv=None) -> int:
    """One `error: ...` line and the exit codes of models/cli.py (1: a bad flag, file or cluster; 2: usage;
    130/143: Ctrl-C/SIGTERM before serving; 0 after serving until Ctrl-C/SIGTERM); --debug: the traceback."""
    from models.cli import run_main
    return run_main(_main, argv, expected=(RuntimeError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
