"""Benchmark configurations: a base LiveConfig from the command line, and variations of it.

    --config "steps=2,window=15" --config "name=quality,steps=4,decoder=vae"
    --configs runs.toml        # [[config]] tables, or a JSON list of objects: [{"steps": 2}, ...]

Keys are LiveConfig fields (runtime/live/config.py), with '-' or '_' (stream-batch = stream_batch), plus
`name` (a label for tables and charts). Values are parsed by the field's type: on/off/true/false/1/0
for booleans, integers for steps/window/resolution/seed, strings otherwise. Every configuration is
validated (LiveConfig.validated) before anything is loaded, so a typo fails in a second.
"""
from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

from runtime.live.config import LiveConfig

_FIELDS = {f.name: f for f in fields(LiveConfig)}
_TRUE, _FALSE = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def parse_value(key: str, value):
    """A config value (string from the CLI, or a JSON/TOML value) as the LiveConfig field's type."""
    f = _FIELDS[key]
    kind = str(f.type)
    if isinstance(value, str):
        v = value.strip()
        if "bool" in kind:
            if v.lower() in _TRUE:
                return True
            if v.lower() in _FALSE:
                return False
            raise ValueError(f"{key}={value!r}: use on/off")
        if "int" in kind:
            if v.lower() in ("none", "") and "None" in kind:
                return None
            try:
                return int(v)
            except ValueError:
                raise ValueError(f"{key}={value!r}: expected an integer") from None
        if "float" in kind:
            return float(v)
        return v
    if "bool" in kind and not isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: expected true/false")
    return value


def normalise(raw: dict) -> tuple[str | None, dict]:
    """(name, LiveConfig overrides) from a dict of raw keys/values; unknown keys raise, naming the choices."""
    name, out = None, {}
    for key, value in raw.items():
        k = key.strip().replace("-", "_")
        if k == "name":
            name = str(value)
            continue
        if k not in _FIELDS:
            raise ValueError(f"unknown config key {key!r}; choose from name, {', '.join(sorted(_FIELDS))}")
        out[k] = parse_value(k, value)
    return name, out


def parse_spec(spec: str) -> tuple[str | None, dict]:
    """'steps=2,window=15' -> (None, {'steps': 2, 'window': 15})."""
    raw = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise ValueError(f"--config {spec!r}: {part!r} is not key=value (e.g. --config \"steps=2,window=15\")")
        k, v = part.split("=", 1)
        raw[k] = v
    return normalise(raw)


def read_file(path: str | Path) -> list[tuple[str | None, dict]]:
    """Configurations from a .json list of objects or a .toml file of [[config]] tables."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--configs {path}: file not found")
    if path.suffix.lower() == ".toml":
        import tomllib
        items = tomllib.loads(path.read_text()).get("config")
    elif path.suffix.lower() == ".json":
        items = json.loads(path.read_text())
    else:
        raise ValueError(f"--configs {path}: use a .json list of objects or a .toml file of [[config]] tables")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items) or not items:
        raise ValueError(f"--configs {path}: expected a non-empty list of tables/objects ([[config]] in TOML)")
    return [normalise(i) for i in items]


def label(cfg: LiveConfig) -> str:
    """A short name that says what a configuration is: backend/dtype/steps/window/stream batch/decoder."""
    parts = [cfg.backend, cfg.dtype, f"{cfg.sampler}{cfg.steps}", f"w{cfg.window}"]
    if cfg.stream_batch:
        parts.append("sb")
    parts.append(cfg.decoder)
    if cfg.resolution:
        parts.append(str(cfg.resolution))
    return "/".join(parts)


def build(base: LiveConfig, variations: list[tuple[str | None, dict]]) -> list[tuple[str, LiveConfig]]:
    """(name, validated config) per variation of `base` (just the base when there are none). Names are unique."""
    out: list[tuple[str, LiveConfig]] = []
    for name, overrides in variations or [(None, {})]:
        try:
            cfg = replace(base, **overrides).validated()
        except ValueError as e:
            raise ValueError(f"configuration {name or overrides}: {e}") from None
        n = name or label(cfg)
        while n in {m for m, _ in out}:
            n += "'"
        out.append((n, cfg))
    return out
