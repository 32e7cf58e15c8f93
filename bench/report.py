"""Summaries and outputs of bench/latency.py: percentiles, JSON, CSV, the closing table.

Files are written under a temporary name in the output folder and renamed, so a reader never sees
a half-written result. Percentiles interpolate linearly between order statistics
(runtime.live.metrics.percentile, numpy's default method).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from runtime.live.metrics import percentile

SCHEMA = "xportrait-bench-latency/1"


def dist(values: list[float]) -> dict:
    """p50/p90/p99/mean/n of a list of ms values (nan when empty)."""
    vals = [float(v) for v in values]
    return {"p50": percentile(vals, 50), "p90": percentile(vals, 90), "p99": percentile(vals, 99),
            "mean": sum(vals) / len(vals) if vals else math.nan, "n": len(vals)}


def stage_dists(per_frame: list[dict[str, float]]) -> dict[str, dict]:
    """Per-stage distributions from per-frame {stage: ms} dicts (a stage missing in a frame counts 0)."""
    names: list[str] = []
    for frame in per_frame:
        names += [n for n in frame if n not in names]
    return {n: dist([f.get(n, 0.0) for f in per_frame]) for n in names}


def _clean(x):
    """JSON-safe: nan/inf -> None (strict JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, result: dict) -> None:
    write_atomic(path, (json.dumps(_clean(result), indent=1, allow_nan=False) + "\n").encode())


STAGE_COLUMNS = ["config", "stage", "source", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "gflop", "tflops",
                 "peak_share"]
CONFIG_COLUMNS = ["config", "status", "preset", "resolution", "backend", "dtype", "sampler", "steps", "window",
                  "stream_batch", "decoder", "frame_ms_p50", "frame_ms_p90", "frame_ms_p99", "fps_device",
                  "fps_sustained", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "dropped",
                  "gflop_per_frame", "tflops", "peak_share", "peak_allocated_mib", "peak_reserved_mib",
                  "session_mib", "speedup_vs_baseline"]


def _csv(rows: list[dict], columns: list[str]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                    for k, v in r.items()})
    return buf.getvalue().encode()


def stage_rows(result: dict) -> list[dict]:
    rows = []
    for c in result["configs"]:
        for source, stages in (("session", c.get("stages") or {}), ("pipeline", (c.get("pipeline") or {})
                                                                   .get("stages") or {})):
            for name, d in stages.items():
                rows.append({"config": c["name"], "stage": name, "source": source, "p50_ms": d["p50"],
                             "p90_ms": d["p90"], "p99_ms": d["p99"], "mean_ms": d["mean"],
                             "gflop": None if d.get("flops") is None else d["flops"] / 1e9,
                             "tflops": d.get("tflops"), "peak_share": d.get("peak_share")})
    return rows


def config_rows(result: dict) -> list[dict]:
    rows = []
    for c in result["configs"]:
        cfg, frame, pipe = c["config"], c.get("frame_ms") or {}, c.get("pipeline") or {}
        lat, mem = pipe.get("latency_ms") or {}, c.get("memory") or {}
        rows.append({"config": c["name"], "status": c["status"], **{k: cfg.get(k) for k in CONFIG_COLUMNS if k in cfg},
                     "frame_ms_p50": frame.get("p50"), "frame_ms_p90": frame.get("p90"),
                     "frame_ms_p99": frame.get("p99"), "fps_device": c.get("fps_device"),
                     "fps_sustained": pipe.get("fps_sustained"), "latency_ms_p50": lat.get("p50"),
                     "latency_ms_p90": lat.get("p90"), "latency_ms_p99": lat.get("p99"),
                     "dropped": pipe.get("dropped"),
                     "gflop_per_frame": None if c.get("flops") is None else c["flops"]["total_per_frame"] / 1e9,
                     "tflops": c.get("tflops"), "peak_share": c.get("peak_share"),
                     "peak_allocated_mib": mem.get("peak_allocated_mib"),
                     "peak_reserved_mib": mem.get("peak_reserved_mib"),
                     "session_mib": None if "session" not in mem else mem["session"]["total"] / 2**20,
                     "speedup_vs_baseline": c.get("speedup_vs_baseline")})
    return rows


def write_all(out: Path, result: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "latency.json", "configs_csv": out / "configs.csv", "stages_csv": out / "stages.csv"}
    write_json(paths["json"], result)
    write_atomic(paths["configs_csv"], _csv(config_rows(result), CONFIG_COLUMNS))
    write_atomic(paths["stages_csv"], _csv(stage_rows(result), STAGE_COLUMNS))
    return paths


def _f(x, spec: str, width: int) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-".rjust(width)
    return format(x, spec).rjust(width)


def table(result: dict) -> str:
    """The short closing table: one line per configuration (and the baseline)."""
    head = (f"{'configuration':<40} {'frame p50':>9} {'p99':>7} {'FPS dev':>7} {'FPS sus':>7} {'lat p50':>7} "
            f"{'lat p99':>7} {'GFLOP':>8} {'TFLOP/s':>7} {'%peak':>6} {'peak MiB':>8} {'speedup':>7}")
    lines = [f"# {result['env']['device']}  ({result['created']})", head, "-" * len(head)]
    for c in result["configs"]:
        if c["status"] != "ok":
            lines.append(f"{c['name']:<40} {c['status']}")
            continue
        frame, pipe = c["frame_ms"], c.get("pipeline") or {}
        lat = pipe.get("latency_ms") or {}
        share = c.get("peak_share")
        lines.append(
            f"{c['name'][:40]:<40} {_f(frame['p50'], '.1f', 9)} {_f(frame['p99'], '.1f', 7)} "
            f"{_f(c.get('fps_device'), '.1f', 7)} {_f(pipe.get('fps_sustained'), '.1f', 7)} "
            f"{_f(lat.get('p50'), '.0f', 7)} {_f(lat.get('p99'), '.0f', 7)} "
            f"{_f(None if c.get('flops') is None else c['flops']['total_per_frame'] / 1e9, '.1f', 8)} "
            f"{_f(c.get('tflops'), '.3g', 7)} {_f(None if share is None else 100 * share, '.1f', 6)} "
            f"{_f((c.get('memory') or {}).get('peak_allocated_mib'), '.0f', 8)} "
            f"{_f(c.get('speedup_vs_baseline'), '.1f', 6)}x")
    b = result.get("baseline")
    if b and b.get("frame_ms") is not None:
        gf = None if b.get("flops_per_frame") is None else b["flops_per_frame"] / 1e9
        lines.append(f"{'baseline (official-style, scaled)':<40} {_f(b['frame_ms'], '.1f', 9)} {'':>7} "
                     f"{_f(b['fps'], '.2f', 7)} {'':>7} {'':>7} {'':>7} {_f(gf, '.1f', 8)}")
        lines.append(f"  baseline: {b['method']}")
    elif b:
        lines.append(f"baseline: {b.get('status')}")
    lines.append("frame = one session.step, synchronized (device time per frame); FPS sus / lat = the threaded "
                 "pipeline, capture -> presented")
    return "\n".join(lines)
