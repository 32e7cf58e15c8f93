"""Many sessions on Ray Serve (runtime/serve/).

Without Ray (fast): the deployment file and flags, the session router's choices, and the relay
between a fake page and in-process replicas (SessionHost over a SessionManager with a fake model):
least-loaded placement, strict stickiness, a replica killed mid-stream (the session moves with its
uploaded source, the page keeps going, the gap is measured, no frame reaches another session), a
replica out of memory refusing new sessions while its old ones go on, the memory reserve, idle
sessions freed, a model failure moving the session.

With Ray (about 2 min wall on this project's 2-core machine, most of it Ray and replica start-up):
the load test itself at N = 2 on a local Ray with two CPU replicas of the real tiny model, one
replica killed mid-run.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from conftest import require
from runtime.live.config import LiveConfig
from runtime.live.session import Output
from runtime.serve.config import ServeConfig, check_spec, load_file, resolve
from runtime.serve.deployment import SessionHost
from runtime.serve.relay import Relay, ReplicaGone
from runtime.web.config import WebConfig
from runtime.web.images import encode_jpeg
from runtime.web.protocol import pack, unpack
from runtime.web.sessions import SessionManager

ROOT = Path(__file__).resolve().parents[1]
R = 128


# ----------------------------------------------------------------------------------- fakes
class FakeSession:
    def __init__(self, live, cfg):
        self.live, self.cfg, self.calls = live, cfg, []

    def set_source(self, image):
        self.calls.append(("source", round(float(image.float().mean()), 1)))

    def reset(self):
        self.calls.append(("reset",))

    def step(self, pose, local, tag=None, clock=None):
        time.sleep(self.live.delay)
        if self.live.fail_step is not None:
            raise self.live.fail_step
        return Output(torch.full((R, R, 3), 77, dtype=torch.uint8), tag)


class FakeLive:
    def __init__(self, delay: float = 0.01):
        self.cfg = LiveConfig.from_name("tiny", steps=1, window=3)
        self.delay, self.random_weights, self.sessions = delay, True, []
        self.fail_new: BaseException | None = None
        self.fail_step: BaseException | None = None

    def new_session(self, **overrides):
        if self.fail_new is not None:
            raise self.fail_new
        s = FakeSession(self, replace(self.cfg, **overrides))
        self.sessions.append(s)
        return s


def fake_tracker(_landmarks):
    def track(rgb, t):
        pose = cv2.resize(rgb, (R, R))
        return SimpleNamespace(pose=pose, local=np.zeros_like(pose), face=True)
    return track


def make_host(name: str, cfg: ServeConfig | None = None, free_mib=None, landmarker=None, **web) -> SessionHost:
    web = WebConfig(**{"max_sessions": 2, **web})
    source = (np.full((R, R, 3), 100, np.uint8), None)
    manager = SessionManager(FakeLive(), web, source, landmarker=landmarker, tracker_factory=fake_tracker).start()
    return SessionHost(manager, cfg or ServeConfig(), name, free_mib=free_mib)


@dataclass(frozen=True)
class Rid:
    unique_id: str


class LocalBackend:
    """relay.Backend over in-process SessionHosts, placing sessions with the router's own ranking."""

    def __init__(self, hosts: list[SessionHost]):
        self.hosts = {h.name: h for h in hosts}
        self.where: dict[str, str] = {}
        self.dead: set[str] = set()
        self.opens: list[tuple[str, str, bytes | None]] = []  # (sid, replica, source)

    def kill(self, name: str) -> None:
        self.dead.add(name)
        self.hosts[name].stop()

    def _holder(self, sid: str) -> SessionHost:
        name = self.where.get(sid)
        if name is None or name in self.dead:
            raise ReplicaGone(f"replica {name} died")
        return self.hosts[name]

    async def open(self, sid, source, steps, window, avoid=()):
        from runtime.serve.router import rank_new
        alive = [SimpleNamespace(replica_id=Rid(n), routing_stats=h.load())
                 for n, h in self.hosts.items() if n not in self.dead]
        best = rank_new(alive, {}, tuple(avoid))[0][0].replica_id.unique_id
        self.where[sid] = best
        self.opens.append((sid, best, source))
        return await self.hosts[best].open(sid, source, steps, window)

    async def push(self, sid, data, t, seq):
        return await self._holder(sid).push(sid, data, t, seq)

    async def frames(self, sid):
        host = self._holder(sid)
        async for item in host.frames(sid):
            if host.name in self.dead:
                raise ReplicaGone(f"replica {host.name} died")
            yield item

    async def set_source(self, sid, data):
        return await self._holder(sid).set_source(sid, data)

    async def command(self, sid, kind, steps=None, window=None):
        return await self._holder(sid).command(sid, kind, steps, window)

    async def close(self, sid, reason):
        return await self._holder(sid).close(sid, reason)


class FakePage:
    """relay.Socket: what the page receives, and a queue of what it sends."""

    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.texts: list[dict] = []
        self.frames: list[dict] = []
        self.closed: tuple[int, str] | None = None

    async def receive(self):
        return await self.inbox.get()

    async def send(self, msg):
        if isinstance(msg, bytes):
            head, jpeg = unpack(msg)
            self.frames.append({**head, "at": time.monotonic(), "jpeg_len": len(jpeg)})
        else:
            self.texts.append(json.loads(msg))

    async def close(self, code, reason):
        self.closed = (code, reason)
        await self.inbox.put(None)

    def of(self, kind: str) -> list[dict]:
        return [t for t in self.texts if t.get("type") == kind]


JPEG = encode_jpeg(np.full((64, 64, 3), 128, np.uint8))


async def wait_for(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def play(page: FakePage, first_seq: int, n: int, every: float = 0.02, max_in_flight: int = 2):
    """Send n frames like the page: at most max_in_flight unanswered (frame or skip settles)."""
    seq = first_seq
    for _ in range(n):
        def answered():
            got = [f["seq"] for f in page.frames] + [t["seq"] for t in page.of("skip")]
            return seq - max(got, default=first_seq - 1) <= max_in_flight
        await wait_for(answered, 15.0, "flow control")
        await page.inbox.put(pack({"kind": "frame", "seq": seq, "t": float(seq)}, JPEG))
        seq += 1
        await asyncio.sleep(every)
    return seq


def relay_for(backend, **serve) -> Relay:
    return Relay(backend, WebConfig(max_sessions=2), ServeConfig(recover_timeout_s=5.0, **serve))


# ------------------------------------------------------------------------------------ config
def test_deploy_file_yaml_and_json_and_typos(tmp_path):
    spec = {"serve": {"replicas": 3, "port": 8100}, "live": {"steps": 1, "window": 3},
            "web": {"max_sessions": 5, "idle_timeout": 20}, "model": {"source": "me.png"}}
    (tmp_path / "d.json").write_text(json.dumps(spec))
    (tmp_path / "d.yaml").write_text("serve:\n  replicas: 3\n  port: 8100\nlive: {steps: 1, window: 3}\n"
                                     "web: {max_sessions: 5, idle_timeout: 20}\nmodel: {source: me.png}\n")
    assert load_file(tmp_path / "d.json") == load_file(tmp_path / "d.yaml") == spec
    cfg, live, web, model = resolve(spec)
    assert (cfg.replicas, cfg.port, live.steps, live.window, web.max_sessions, web.idle_timeout) == (3, 8100, 1, 3, 5, 20)
    assert web.host == "127.0.0.1" and model == {"source": "me.png"}
    with pytest.raises(ValueError, match="unknown key.*replicaz"):
        check_spec({"serve": {"replicaz": 2}})
    with pytest.raises(ValueError, match="unknown section"):
        check_spec({"servve": {}})
    with pytest.raises(ValueError, match="--max-replicas"):
        resolve({"serve": {"replicas": None, "min_replicas": 5, "max_replicas": 2}})
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_file(tmp_path / "missing.yaml")


def test_flags_override_the_file_and_deploy_yaml_round_trips(tmp_path):
    import yaml

    from runtime.serve.__main__ import parser, spec_from_args
    from runtime.serve.app import deploy_yaml, replica_options
    (tmp_path / "d.yaml").write_text("serve: {replicas: 3}\nweb: {max_sessions: 5}\n")
    a = parser().parse_args(["--config", str(tmp_path / "d.yaml"), "--sessions-per-replica", "2", "--autoscale",
                             "--max-replicas", "6", "--steps", "1", "--checkpoint", "x.th"])
    spec = spec_from_args(a)
    cfg, live, web, model = resolve(spec)
    assert cfg.replicas is None and cfg.max_replicas == 6 and web.max_sessions == 2 and live.steps == 1
    assert model["checkpoint"] == "x.th"
    doc = yaml.safe_load(deploy_yaml(spec))
    app = doc["applications"][0]
    assert app["import_path"] == "runtime.serve.app:build_app" and app["args"] == spec
    opts = replica_options(cfg, web.max_sessions)
    assert opts["autoscaling_config"]["max_replicas"] == 6 and "num_replicas" not in opts
    assert str(opts["request_router_config"].request_router_class).endswith("router.SessionRouter")
    fixed = replica_options(ServeConfig(replicas=4, replica_gpus=1), 3)
    assert fixed["num_replicas"] == 4 and fixed["ray_actor_options"]["num_gpus"] == 1


# ------------------------------------------------------------------------------------ router
def test_router_places_new_sessions_least_loaded_and_keeps_them_sticky():
    require("ray")
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from runtime.serve.router import SessionRouter

    def replica(name, count=0, accepting=True):
        return SimpleNamespace(replica_id=Rid(name), routing_stats={"count": count, "accepting": accepting,
                                                                    "sessions": []})

    def request(method, sid, **kwargs):
        return PendingRequest(args=[sid], kwargs=kwargs, metadata=RequestMetadata(
            request_id="r", internal_request_id=f"{method}-{sid}", call_method=method))

    async def scenario():
        router = SessionRouter.__new__(SessionRouter)
        router.initialize_state()
        a, b, c = replica("a", count=1), replica("b"), replica("c", accepting=False)
        reps = [a, b, c]
        ranks = await router.choose_replicas(reps, request("open", "s1"))
        assert [r[0].replica_id.unique_id for r in ranks] == ["b", "a", "c"]  # least loaded, refusing last
        # a second open before the first was accepted goes elsewhere (b now counts s1 tentatively)
        a.routing_stats["count"] = 0
        ranks2 = await router.choose_replicas(reps, request("open", "s2"))
        assert ranks2[0][0].replica_id.unique_id == "a"
        router.on_request_routed(request("open", "s1"), b.replica_id, None)
        router.on_request_routed(request("open", "s2"), a.replica_id, None)
        for method in ("push", "frames", "set_source", "command", "close"):
            assert await router.choose_replicas(reps, request(method, "s1")) == [[b]]  # only its replica
        assert (await router.choose_replicas(reps, request("open", "s3", avoid=("b",))))[0][0] is not b
        router.on_request_routed(request("close", "s1"), b.replica_id, None)
        assert "s1" not in router._where
        router._forget(lambda rid: rid == a.replica_id)  # a died: s2 has no holder now
        ranks = await router.choose_replicas([b, c], request("push", "s2"))
        assert ranks[0] == [b]  # the least loaded answers "unknown session", and the relay re-opens
        # a session placed by another router is found through the replicas' reported lists
        b.routing_stats["sessions"] = ["s9"]
        assert await router.choose_replicas([b, c], request("push", "s9")) == [[b]]

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ relay + host
def test_sessions_spread_stick_and_never_cross():
    async def scenario():
        hosts = [make_host("r1"), make_host("r2")]
        backend = LocalBackend(hosts)
        pages = [FakePage(), FakePage()]
        runs = [asyncio.create_task(relay_for(backend).run(p)) for p in pages]
        await wait_for(lambda: all(p.of("hello") for p in pages), what="hello")
        hello = [p.of("hello")[0] for p in pages]
        assert {h["replica"] for h in hello} == {"r1", "r2"}  # one each: least loaded
        await asyncio.gather(play(pages[0], 1000, 15), play(pages[1], 2000, 15))
        await wait_for(lambda: all(len(p.frames) >= 5 for p in pages), what="frames")
        for p, h, base in zip(pages, hello, (1000, 2000)):
            assert all(f["session"] == h["session"] and base <= f["seq"] < base + 15 for f in p.frames)
            assert {f["replica"] for f in p.frames} == {h["replica"]}
        for p in pages:
            await p.inbox.put(None)
        await asyncio.gather(*runs)
        assert all(h.load()["count"] == 0 for h in hosts)  # closing the page frees its session
        for h in hosts:
            h.stop()

    asyncio.run(scenario())


def test_killed_replica_moves_the_session_with_its_source():
    source_png = (ROOT / "samples" / "source.png").read_bytes()

    async def scenario():
        from runtime.landmarks import default_landmarker
        lm = default_landmarker()
        hosts = [make_host("r1", landmarker=lm), make_host("r2", landmarker=lm)]
        backend = LocalBackend(hosts)
        page, other = FakePage(), FakePage()
        relay = relay_for(backend)
        runs = [asyncio.create_task(relay.run(page)), asyncio.create_task(relay_for(backend).run(other))]
        await wait_for(lambda: page.of("hello") and other.of("hello"), what="hello")
        sid, first = page.of("hello")[0]["session"], page.of("hello")[0]["replica"]
        await page.inbox.put(pack({"kind": "source"}, source_png))
        await wait_for(lambda: page.of("source"), 30.0, "source applied")
        assert page.of("source")[0]["ok"] is True
        seq = await play(page, 1, 10)
        n_before = len(page.frames)
        other_before = len(other.frames)
        backend.kill(first)
        seq = await play(page, seq, 15)
        await wait_for(lambda: len(page.frames) > n_before + 3, what="frames after the move")
        moved = page.of("moved")
        assert len(moved) == 1 and moved[0]["replica"] != first and moved[0]["temporal_cache"] == "restarted"
        assert page.of("hello")[0]["session"] == sid and all(f["session"] == sid for f in page.frames)
        assert {f["replica"] for f in page.frames[n_before:]} == {moved[0]["replica"]}
        # the source the page uploaded was sent again to the new replica and applied there
        reopen = [o for o in backend.opens if o[0] == sid][-1]
        assert reopen[1] == moved[0]["replica"] and reopen[2] == source_png
        new_live = backend.hosts[moved[0]["replica"]].manager.live
        uploaded_mean = [c for s in new_live.sessions for c in s.calls if c[0] == "source"]
        assert any(c[1] != 100.0 for c in uploaded_mean)  # not the default source (mean 100)
        move = relay.state.moves[0]
        assert move.gap_ms is not None and 0 < move.gap_ms < 5000 and move.reopen_ms is not None
        # the lost frames were settled with a skip, so the page's flow control went on
        assert any("moved" in s["reason"] for s in page.of("skip"))
        assert len(other.frames) == other_before or all(f["session"] != sid for f in other.frames)
        for p in (page, other):
            await p.inbox.put(None)
        await asyncio.gather(*runs)
        for h in hosts:
            h.stop()

    asyncio.run(scenario())


def test_out_of_memory_refuses_new_sessions_and_keeps_old_ones():
    async def scenario():
        host = make_host("r1", ServeConfig(oom_cooldown_s=60))
        ok = await host.open("old")
        assert ok["ok"]
        host.manager.live.fail_new = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        refused = await host.open("new")
        assert refused["error"] == "busy" and "out of GPU memory" in refused["message"]
        host.manager.live.fail_new = None
        again = await host.open("new2")  # the cool-down holds even though memory may be back
        assert again["error"] == "busy" and "ran out of GPU memory" in again["message"]
        assert host.load()["accepting"] is False and host.load()["sessions"] == ["old"]
        assert (await host.push("old", JPEG, 1.0, 1))["ok"]
        frames = host.frames("old")
        item = await asyncio.wait_for(frames.__anext__(), 10)
        assert item["kind"] == "frame" and item["header"]["session"] == "old"
        await frames.aclose()
        host.stop()

        # through the relay: the refusing replica is ranked last, the new session lands elsewhere
        hosts = [make_host("r1", ServeConfig(oom_cooldown_s=60)), make_host("r2")]
        hosts[0].oom_until = time.monotonic() + 60
        page = FakePage()
        run = asyncio.create_task(relay_for(LocalBackend(hosts)).run(page))
        await wait_for(lambda: page.of("hello"), what="hello")
        assert page.of("hello")[0]["replica"] == "r2"
        await page.inbox.put(None)
        await run
        for h in hosts:
            h.stop()

    asyncio.run(scenario())


def test_memory_reserve_refuses_a_session_that_would_not_fit():
    async def scenario():
        host = make_host("g1", ServeConfig(memory_reserve_mib=1024, session_mib=600), free_mib=lambda: 1500.0)
        reply = await host.open("s")
        assert reply["error"] == "busy" and "1500 MiB" in reply["message"] and "600 MiB" in reply["message"]
        roomy = make_host("g2", ServeConfig(memory_reserve_mib=1024, session_mib=600), free_mib=lambda: 4000.0)
        assert (await roomy.open("s"))["ok"]
        for h in (host, roomy):
            h.stop()

    asyncio.run(scenario())


def test_all_replicas_full_gives_the_page_a_busy_answer():
    async def scenario():
        hosts = [make_host("r1", max_sessions=1), make_host("r2", max_sessions=1)]
        backend = LocalBackend(hosts)
        pages = [FakePage() for _ in range(3)]
        runs = [asyncio.create_task(relay_for(backend).run(p)) for p in pages]
        await wait_for(lambda: sum(bool(p.of("hello")) for p in pages) == 2 and any(p.closed for p in pages),
                       what="two sessions and one busy")
        busy = [p for p in pages if p.of("busy")]
        assert len(busy) == 1 and busy[0].closed[0] == 1013 and "maximum of 1 sessions" in busy[0].of("busy")[0]["message"]
        for p in pages:
            await p.inbox.put(None)
        await asyncio.gather(*runs)
        for h in hosts:
            h.stop()

    asyncio.run(scenario())


def test_idle_session_is_freed_and_the_page_told():
    async def scenario():
        host = make_host("r1", idle_timeout=0.6)
        page = FakePage()
        run = asyncio.create_task(relay_for(LocalBackend([host])).run(page))
        await wait_for(lambda: page.closed is not None, 10.0, "idle close")
        assert page.closed[0] == 1001 and "idle" in page.of("closed")[0]["reason"]
        await run
        assert host.load()["count"] == 0
        host.stop()

    asyncio.run(scenario())


def test_model_failure_moves_the_session_to_another_replica():
    async def scenario():
        hosts = [make_host("r1"), make_host("r2")]
        backend = LocalBackend(hosts)
        page = FakePage()
        relay = relay_for(backend)
        run = asyncio.create_task(relay.run(page))
        await wait_for(lambda: page.of("hello"), what="hello")
        first = page.of("hello")[0]["replica"]
        backend.hosts[first].manager.live.fail_step = RuntimeError("CUDA error: an illegal memory access")
        await play(page, 1, 12)
        await wait_for(lambda: page.of("moved") and page.frames, 10.0, "moved and a frame")
        assert page.of("moved")[0]["replica"] != first and relay.state.moves[0].reason.startswith("the model failed")
        await page.inbox.put(None)
        await run
        for h in hosts:
            h.stop()

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- with Ray
def test_load_test_two_sessions_one_replica_killed(tmp_path):
    """The CI load test: a local Ray (loopback), 2 CPU replicas of the real tiny model (1 step,
    window 3), 2 synthetic cameras for 25 s, the busiest replica killed 10 s in."""
    require("ray")
    from runtime.serve import loadtest
    a = loadtest.parser().parse_args(["--sessions", "2", "--seconds", "25", "--kill-at", "10", "--replicas", "2",
                                      "--idle-seconds", "0", "--num-cpus", "3", "--json", str(tmp_path / "load.json")])
    seen = {}

    def http_checks(url):  # the same page and checks as runtime/web, through Serve's proxy
        import urllib.error
        import urllib.request

        import aiohttp
        with urllib.request.urlopen(url, timeout=30) as r:
            seen["page"] = (r.status, r.headers.get("Content-Security-Policy", ""), r.read())
        try:
            urllib.request.urlopen(url + "static/..%2fconfig.py", timeout=30)
        except urllib.error.HTTPError as e:
            seen["traversal"] = e.code

        async def foreign_origin():
            async with aiohttp.ClientSession() as http:
                try:
                    async with http.ws_connect(url.replace("http", "ws") + "ws", origin="https://evil.example"):
                        return "connected"
                except aiohttp.WSServerHandshakeError as e:
                    return e.status
        seen["origin"] = asyncio.run(foreign_origin())

    t0 = time.perf_counter()
    report = loadtest.run(a, check=http_checks)
    wall = time.perf_counter() - t0
    print(loadtest.table(report), f"\nwall {wall:.0f} s, app start-up {report['startup_s']} s")
    assert loadtest.failures(report) == []
    p = report["phases"][0]
    assert p["stray"] == 0 and p["dropped_sessions"] == 0 and len(p["replicas_used"]) == 2
    hit = [s for s in p["kill"]["sessions"] if s["on_killed_replica"]]
    assert hit and all(s["moved_to"] and s["gap_s"] is not None and s["frames_after"] > 0 for s in hit)
    assert all(c["fps"] > 0 and c["p50_ms"] is not None for c in p["clients"])
    status, csp, body = seen["page"]
    assert status == 200 and "default-src 'self'" in csp and b"app.js" in body
    assert seen["traversal"] == 404 and seen["origin"] == 403
