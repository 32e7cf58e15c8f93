"""The benchmark's PNG: stacked per-stage medians per configuration, and latency over time.

Left: one bar per configuration, its session stages (median ms per frame) stacked, face tracking
(the pipeline's track stage) on top. Right: capture -> presented latency of every measured frame of
the threaded pipeline against time since the first one, one line per configuration. Needs
matplotlib (Agg backend, no display); written to a temporary name and renamed.
"""
from __future__ import annotations

from pathlib import Path

STAGE_ORDER = ["track", "upload", "convert", "hint", "control", "unet", "sampler", "decode", "download"]


def _stacks(result: dict) -> tuple[list[str], dict[str, list[float]]]:
    ok = [c for c in result["configs"] if c["status"] == "ok"]
    names = [c["name"] for c in ok]
    stacks: dict[str, list[float]] = {}
    for i, c in enumerate(ok):
        stages = {k: v["p50"] for k, v in (c.get("stages") or {}).items()}
        track = ((c.get("pipeline") or {}).get("stages") or {}).get("track")
        if track is not None:
            stages["track"] = track["p50"]
        for s in sorted(stages, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER)):
            stacks.setdefault(s, [0.0] * len(ok))[i] = stages[s] or 0.0
    return names, stacks


def write_chart(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, stacks = _stacks(result)
    if not names:
        raise ValueError("no configuration ran: nothing to chart")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
    bottom = [0.0] * len(names)
    for stage, values in stacks.items():
        left.bar(range(len(names)), values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    left.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    left.set_ylabel("ms per frame (median)")
    left.set_title("per-stage time (session stages; track from the pipeline)")
    left.legend(fontsize=7)
    for c in result["configs"]:
        if c["status"] != "ok" or not (c.get("pipeline") or {}).get("series"):
            continue
        t, ms = zip(*c["pipeline"]["series"])
        right.plot(t, ms, marker=".", linewidth=1, label=c["name"])
    right.set_xlabel("s since the first measured frame")
    right.set_ylabel("latency capture -> presented (ms)")
    right.set_title("latency over time (threaded pipeline)")
    right.legend(fontsize=7)
    fig.suptitle(f"{result['env']['device']}, {result['created']}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
