"""python -m runtime.serve.loadtest: N synthetic cameras against a local Ray Serve app, one replica killed.

    python -m runtime.serve.loadtest                                   # N = 1, 2, 4; 30 s each; kill during N = 4
    python -m runtime.serve.loadtest --sessions 2 --seconds 25 --kill-at 10 --json out.json   # what CI runs

It starts Ray on this machine (loopback only; or joins --address), deploys the app (tiny preset,
1 step, window 3 by default, `--replicas` CPU replicas), then for each N plays samples/driving.mp4
as the camera of N concurrent pages (runtime/serve/client.py) for a bounded time, and stops by itself.
In the kill phase it kills (ray.kill) the replica holding the most sessions `--kill-at` s in, and
reports what each session saw: the gap between its last frame before and first frame after, the
frames it lost, and the frames it got afterwards. Every frame is checked against the session that
sent it (client.py); a stray frame fails the run (exit 1), as does a session that ended early.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from runtime.serve.client import ClientResult, camera_frames, latency_stats, play

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_replica(unique_id: str) -> str:
    """ray.kill the LiveReplica actor whose Serve replica id is `unique_id`; returns its actor name."""
    import ray
    for a in ray.util.list_named_actors(all_namespaces=True):
        if "LiveReplica" in a["name"] and a["name"].endswith(unique_id):
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
            return a["name"]
    raise LookupError(f"no LiveReplica actor with replica id {unique_id!r}")


ROLES = {"proxy": "ray::ProxyActor", "ingress": "Ingress", "replicas": "LiveReplica"}


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) so far of this machine's Serve processes, by role, read from
    /proc (Ray titles its workers "ray::<actor>"). Only meaningful for a Ray on this machine."""
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys(ROLES, 0.0)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if not title.startswith("ray::"):
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        for role, needle in ROLES.items():
            if needle in title:
                out[role] += (int(fields[11]) + int(fields[12])) / tick
    return out


def idle_cpu_rate(seconds: float) -> dict[str, float]:
    """CPU seconds per second that the proxy + ingress use with no session (Serve's background work)."""
    c0 = cpu_by_role()
    time.sleep(seconds)
    c1 = cpu_by_role()
    return {"relay": (c1["proxy"] + c1["ingress"] - c0["proxy"] - c0["ingress"]) / seconds,
            "replicas": (c1["replicas"] - c0["replicas"]) / seconds}


async def phase(url: str, frames: list[bytes], n: int, seconds: float, marker0: int,
                kill_at: float | None = None, idle_rate: dict | None = None) -> dict:
    """N concurrent sessions for `seconds`; with kill_at, kill the busiest replica then."""
    cpu0, t0 = cpu_by_role(), time.monotonic()
    results = [ClientResult(marker0 + i) for i in range(n)]
    plays = [asyncio.create_task(play(url, frames, seconds, r.marker, result=r)) for r in results]
    kill = None
    if kill_at is not None:
        await asyncio.sleep(kill_at)
        held: dict[str, int] = {}
        for r in results:
            if r.replicas and r.replicas[-1]:
                held[r.replicas[-1]] = held.get(r.replicas[-1], 0) + 1
        if held:
            victim = max(held, key=held.get)
            t_kill = time.monotonic()
            name = await asyncio.get_running_loop().run_in_executor(None, kill_replica, victim)
            kill = {"replica": victim, "actor": name, "t": t_kill, "sessions_on_it": held[victim]}
    await asyncio.gather(*plays)
    cpu1, wall = cpu_by_role(), time.monotonic() - t0
    messages = sum(r.sent + r.received for r in results)
    cpu = {role: round(cpu1[role] - cpu0[role], 2) for role in ROLES}
    # transport CPU per message relayed (a camera frame in or an animated frame out): proxy + ingress,
    # less what they burn idle (Serve's own polling) over the same time
    busy = cpu["proxy"] + cpu["ingress"] - wall * (idle_rate or {}).get("relay", 0.0)
    cpu["relay_ms_per_message"] = round(max(0.0, busy) * 1e3 / messages, 2) if messages else None
    out = {"n": n, "wall_s": round(wall, 1), "cpu_s": cpu, "messages": messages, "seconds": seconds, **latency_stats(results), "sent": sum(r.sent for r in results),
           "animated": sum(r.received for r in results), "stray": sum(r.stray for r in results),
           "dropped_sessions": sum(1 for r in results if r.session is None or r.closed),
           "replicas_used": sorted({r.replicas[0] for r in results if r.replicas}),
           "clients": [r.summary() for r in results]}
    if kill is not None:
        out["kill"] = {k: v for k, v in kill.items() if k != "t"}
        out["kill"]["sessions"] = [kill_report(r, kill) for r in results]
    return out


def kill_report(r: ClientResult, kill: dict) -> dict:
    t = kill["t"]
    moves_before = len([m for m in r.moves if m["at"] < t])
    hit = moves_before < len(r.replicas) and r.replicas[moves_before] == kill["replica"]
    before = [a for a in r.arrivals if a <= t]
    after = [a for a in r.arrivals if a > t]
    gap = r.gap_after(t)
    lost = r.lost_between(before[-1] if before else t, after[0] if after else float("inf"))
    return {"session": r.session, "on_killed_replica": hit, "moved_to": [m.get("replica") for m in r.moves],
            "reopen_ms": [m.get("reopen_ms") for m in r.moves], "gap_s": round(gap, 2) if gap is not None else None,
            "frames_lost": lost, "frames_after": len(after), "closed": r.closed}


def spec_for(a: argparse.Namespace) -> dict:
    serve = {"port": a.port or free_port(), "replicas": a.replicas, "replica_cpus": 1.0, "num_cpus": a.num_cpus,
             "routing_stats_period_s": 1.0}
    if a.address:
        serve["address"] = a.address
    return {"serve": serve, "live": {"steps": a.steps, "window": a.window},
            "web": {"max_sessions": a.sessions_per_replica, "idle_timeout": 30.0}}


def run(a: argparse.Namespace, check=None) -> dict:
    """The whole load test; returns the report (also written to --json). `check(url)` runs while
    the app is still up, after the phases (tests use it for HTTP checks)."""
    from runtime.serve.app import start, stop
    from runtime.serve.config import resolve
    spec = spec_for(a)
    cfg = resolve(spec)[0]
    frames = camera_frames(a.video, side=a.side)
    t0 = time.perf_counter()
    url = start(spec)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "spec": spec, "startup_s":
              round(time.perf_counter() - t0, 1), "phases": []}
    print(f"app up in {report['startup_s']} s at {url}", file=sys.stderr, flush=True)
    try:
        idle = idle_cpu_rate(a.idle_seconds) if a.idle_seconds > 0 else None
        report["idle_cpu_per_s"] = {k: round(v, 3) for k, v in (idle or {}).items()}
        for i, n in enumerate(a.sessions):
            kill_at = a.kill_at if (a.kill_at is not None and n == (a.kill_phase or a.sessions[-1])) else None
            res = asyncio.run(phase(url, frames, n, a.seconds, marker0=100 * (i + 1), kill_at=kill_at, idle_rate=idle))
            report["phases"].append(res)
            print(phase_line(res), file=sys.stderr, flush=True)
            if kill_at is not None:
                break  # the killed replica is being replaced: later phases would measure its start-up
            time.sleep(a.pause)
        if check is not None:
            check(url)
    finally:
        stop(cfg)
    return report


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}"


def phase_line(p: dict) -> str:
    return (f"N={p['n']}: {p['fps_mean']} FPS/session (min {p['fps_min']}), p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms, "
            f"stray {p['stray']}, dropped sessions {p['dropped_sessions']}, replicas {len(p['replicas_used'])}, "
            f"cpu {p['cpu_s']}")


def table(report: dict) -> str:
    rows = ["| N sessions | FPS per session (mean / min) | latency p50 ms | p99 ms | outside the replica p50 ms "
            "| frames sent / animated | sessions dropped | stray frames | relay CPU ms / message |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in report["phases"]:
        rows.append(f"| {p['n']}{' (kill)' if 'kill' in p else ''} | {p['fps_mean']} / {p['fps_min']} | {p['p50_ms']} "
                    f"| {p['p99_ms']} | {p['outside_p50_ms']} | {p['sent']} / {p['animated']} | {p['dropped_sessions']} "
                    f"| {p['stray']} | {p['cpu_s']['relay_ms_per_message']} |")
    for p in report["phases"]:
        if "kill" in p:
            rows += ["", f"Killed replica {p['kill']['replica']} ({p['kill']['sessions_on_it']} sessions on it):", "",
                     "| session | on killed replica | moved to | re-open ms | gap s | frames lost | frames after |",
                     "|---|---|---|---:|---:|---:|---:|"]
            for s in p["kill"]["sessions"]:
                rows.append(f"| {s['session']} | {s['on_killed_replica']} | {', '.join(map(str, s['moved_to'])) or '-'} "
                            f"| {', '.join(map(str, s['reopen_ms'])) or '-'} | {s['gap_s']} | {s['frames_lost']} "
                            f"| {s['frames_after']} |")
    return "\n".join(rows)


def failures(report: dict) -> list[str]:
    out = []
    for p in report["phases"]:
        if p["stray"]:
            out.append(f"N={p['n']}: {p['stray']} frames reached a session that did not send them")
        if p["dropped_sessions"]:
            out.append(f"N={p['n']}: {p['dropped_sessions']} session(s) ended early or never opened")
        for c in p["clients"]:
            if c["received"] == 0:
                out.append(f"N={p['n']}: session {c['session']} got no frame")
        for s in p.get("kill", {}).get("sessions", []):
            if s["on_killed_replica"] and not s["moved_to"]:
                out.append(f"session {s['session']} was on the killed replica and was not moved")
            if s["frames_after"] == 0:
                out.append(f"session {s['session']} got no frame after the kill")
    return out


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.serve.loadtest", description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4], help="N per phase (default 1 2 4)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each phase (default 30)")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--sessions-per-replica", type=int, default=2)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--kill-at", type=float, default=12.0, help="kill a replica this many s into the kill phase")
    p.add_argument("--no-kill", dest="kill_at", action="store_const", const=None)
    p.add_argument("--kill-phase", type=int, help="the N whose phase has the kill (default: the last)")
    p.add_argument("--pause", type=float, default=3.0, help="seconds between phases")
    p.add_argument("--idle-seconds", type=float, default=10.0,
                   help="measure the relay's idle CPU this long first (0: skip; the relay figure is then gross)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--address", help="join this Ray cluster instead of starting one")
    p.add_argument("--port", type=int, help="Serve's HTTP port (default: a free one)")
    p.add_argument("--video", type=Path, default=ROOT / "samples" / "driving.mp4")
    p.add_argument("--side", type=int, default=256, help="camera frame size sent (longer side)")
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if a.seconds <= 0 or a.seconds > 600 or not a.sessions or max(a.sessions) > 64 or min(a.sessions) < 1:
        print("error: --seconds must be in (0, 600] and --sessions in 1..64", file=sys.stderr)
        return 2
    try:
        report = run(a)
    except Exception as e:  # noqa: BLE001 - one line for the user
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(report))
    if a.json:
        write_json(a.json, report)
    bad = failures(report)
    for line in bad:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
