"""Ray Serve settings: one dataclass with presets, from flags or a YAML/JSON file, checked before Ray starts.

A deployment is described by one plain dict that also travels in `serve deploy` files (app.py):

    {"serve": {...ServeConfig...}, "live": {...LiveConfig...}, "web": {...WebConfig...},
     "model": {"checkpoint": ..., "taesd": ..., "lora": ..., "engines": ..., "source": ...}}

`load_file(path)` reads that dict from YAML or JSON; flags given on the command line override it.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.live.config import LiveConfig
    from runtime.web.config import WebConfig

MODEL_KEYS = ("checkpoint", "taesd", "lora", "engines", "source")
SECTIONS = ("serve", "live", "web", "model")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"           # Serve's HTTP proxy; loopback unless told otherwise
    port: int = 8000
    address: str | None = None        # Ray cluster to join ("auto" after `ray start --head`); None: start one here
    num_cpus: int | None = None       # logical CPUs of a Ray started here (None: Ray counts them)
    app_name: str = "xportrait"
    replicas: int | None = 2          # fixed number of model replicas; None: autoscale in [min, max]
    min_replicas: int = 1
    max_replicas: int = 4
    target_sessions: float = 2.0      # autoscaling target: sessions (= open frame streams) per replica
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0  # a replica that goes away moves its sessions: scale down slowly
    replica_gpus: float = 0.0         # 1 on a GPU machine: one replica per GPU
    replica_cpus: float = 1.0         # CPU replicas also set torch's thread count from this
    ingress_replicas: int = 1         # replicas of the WebSocket relay (cheap: bytes only)
    memory_reserve_mib: float = 1024  # GPU memory a replica keeps free; a new session must fit above it
    session_mib: float | None = None  # memory of one session if known (else the largest one seen so far)
    oom_cooldown_s: float = 30.0      # after an out-of-memory refusal, refuse new sessions this long
    recover_timeout_s: float = 60.0   # how long the relay tries to re-create a session whose replica died
    routing_stats_period_s: float = 1.0
    health_check_period_s: float = 5.0

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ServeConfig":
        if name not in SERVE_PRESETS:
            raise KeyError(f"unknown serve preset {name!r}; choose one of {', '.join(SERVE_PRESETS)}")
        return replace(SERVE_PRESETS[name], **overrides)

    def validated(self) -> "ServeConfig":
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: must be in 0..65535")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"--replicas {self.replicas}: must be >= 1 (or leave it out to autoscale)")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"--min-replicas {self.min_replicas} --max-replicas {self.max_replicas}: need "
                             "0 <= min <= max and max >= 1")
        for name in ("target_sessions", "replica_cpus", "recover_timeout_s", "routing_stats_period_s",
                     "health_check_period_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} {getattr(self, name)}: must be > 0")
        for name in ("replica_gpus", "memory_reserve_mib", "oom_cooldown_s", "upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)}: must be >= 0")
        if self.ingress_replicas < 1:
            raise ValueError(f"--ingress-replicas {self.ingress_replicas}: must be >= 1")
        if self.session_mib is not None and self.session_mib <= 0:
            raise ValueError(f"session_mib {self.session_mib}: must be > 0")
        return self

    def torch_threads(self) -> int:
        return max(1, math.floor(self.replica_cpus))

    def to_dict(self) -> dict:
        return asdict(self)


SERVE_PRESETS: dict[str, ServeConfig] = {
    # this machine: a local Ray, two CPU replicas (tests, the load test, a demo)
    "local": ServeConfig(),
    # one machine with several GPUs: one replica per GPU, autoscaled between 1 and 8
    "gpu": ServeConfig(replicas=None, min_replicas=1, max_replicas=8, replica_gpus=1.0, replica_cpus=4.0,
                       target_sessions=3.0, ingress_replicas=2),
    # a Ray cluster (ray start --head / --address): join it and scale to many GPUs
    "cluster": ServeConfig(address="auto", replicas=None, min_replicas=2, max_replicas=256, replica_gpus=1.0,
                           replica_cpus=4.0, target_sessions=3.0, ingress_replicas=4),
}


def load_file(path: str | Path) -> dict:
    """The deployment dict from a .yaml/.yml/.json file (sections serve, live, web, model)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text) or {}
    elif path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"--config {path}: use a .yaml, .yml or .json file")
    return check_spec(data, str(path))


def check_spec(data, where: str = "the deployment spec") -> dict:
    """Unknown sections or keys are errors (a typo must not silently fall back to a default)."""
    from runtime.live.config import LiveConfig
    from runtime.web.config import WebConfig
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping with sections {', '.join(SECTIONS)}")
    known = {"serve": {f.name for f in fields(ServeConfig)} | {"preset"},
             "live": {f.name for f in fields(LiveConfig)} | {"preset_name"},
             "web": {f.name for f in fields(WebConfig)}, "model": set(MODEL_KEYS)}
    out = {}
    for section, values in data.items():
        if section not in known:
            raise ValueError(f"{where}: unknown section {section!r}; use {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ValueError(f"{where}: section {section!r} must be a mapping")
        bad = sorted(set(values) - known[section])
        if bad:
            raise ValueError(f"{where}: unknown key(s) {', '.join(bad)} in section {section!r}; "
                             f"known: {', '.join(sorted(known[section]))}")
        out[section] = dict(values)
    return out


def resolve(spec: dict) -> tuple[ServeConfig, LiveConfig, WebConfig, dict]:
    """The dataclasses of a deployment dict, validated. LiveConfig is not device-checked here: the
    replicas check it where the GPU is (the driver may have none)."""
    from runtime.live.config import LiveConfig
    from runtime.web.config import WebConfig
    spec = check_spec(spec)
    s = dict(spec.get("serve", {}))
    serve_cfg = ServeConfig.from_name(s.pop("preset", "local"), **s).validated()
    live = dict(spec.get("live", {}))
    live_cfg = LiveConfig.from_name(live.pop("preset_name", "tiny"), **live)
    web = dict(spec.get("web", {}))
    if "allow_origins" in web:
        web["allow_origins"] = tuple(web["allow_origins"])
    web_cfg = replace(WebConfig(host=serve_cfg.host, port=serve_cfg.port), **web).validated()
    return serve_cfg, live_cfg, web_cfg, dict(spec.get("model", {}))
