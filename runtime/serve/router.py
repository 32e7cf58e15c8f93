"""The session router: Ray Serve's request-router extension point, keyed by session id.

Every call to a LiveReplica takes the session id as its first argument. The router sends

* `open` to the least loaded replica that accepts new sessions (ranked: load, then refusing or
  avoided replicas last). Load = max(sessions this router placed there, the count the replica last
  reported through `record_routing_stats`), so several ingress replicas see each other's sessions
  within `routing_stats_period_s`;
* every other call of a session to the replica that accepted its `open`, and only there (strict
  affinity: a full queue waits with backoff, it never spills to a replica without the caches);
* a call whose replica is gone (died, scaled down) to the least loaded replica, which answers
  "unknown session": the relay then re-opens the session (relay.py).

One router lives in each process that holds a DeploymentHandle to the deployment; the relay of a
session runs in one ingress replica for the whole WebSocket, so that router's table is the one
that routes all of the session's calls. The table also learns placements from the replicas'
reported session lists, so it survives an ingress restart of its handle.

Serve API: ray.serve.request_router (RequestRouter, PendingRequest, RunningReplica; alpha in Ray 2.60).
"""
from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

OPEN, CLOSE = "open", "close"


def session_of(request: PendingRequest | None) -> str | None:
    if request is None or not request.args or not isinstance(request.args[0], str):
        return None
    return request.args[0]


def rank_new(replicas: list[RunningReplica], placed: dict[Any, int], avoid: tuple[str, ...] = ()) -> list[list]:
    """Replicas for a new session, best first, one per rank: accepting ones by load, then refusing or
    avoided ones; equal loads in random order (so concurrent opens spread)."""
    def key(r: RunningReplica) -> tuple[int, int, float]:
        stats = r.routing_stats or {}
        load = max(placed.get(r.replica_id, 0), int(stats.get("count", 0)))
        refusing = (stats.get("accepting") is False) or r.replica_id.unique_id in avoid
        return (1 if refusing else 0, load, random.random())
    return [[r] for r in sorted(replicas, key=key)]


class SessionRouter(RequestRouter):
    """Sticky per-session routing with least-loaded placement (module docstring)."""

    def initialize_state(self, **kwargs) -> None:
        self._where: dict[str, ReplicaID] = {}      # session -> the replica that accepted its open
        self._tentative: dict[str, ReplicaID] = {}  # session -> first choice of an open not yet accepted

    def _placed(self, exclude: str | None = None) -> dict[ReplicaID, int]:
        out: dict[ReplicaID, int] = {}
        for sid, rid in {**self._tentative, **self._where}.items():
            if sid == exclude:
                continue
            out[rid] = out.get(rid, 0) + 1
        return out

    def _holder(self, sid: str, replicas: list[RunningReplica]) -> RunningReplica | None:
        rid = self._where.get(sid)
        for r in replicas:
            if r.replica_id == rid:
                return r
        for r in replicas:  # placed by another router (or before a handle restart): the replica says so
            if sid in (r.routing_stats or {}).get("sessions", ()):
                self._where[sid] = r.replica_id
                return r
        return None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # a full replica: wait, do not spin
        sid = session_of(pending_request)
        method = pending_request.metadata.call_method if pending_request is not None else ""
        if sid is not None and method != OPEN:
            holder = self._holder(sid, candidate_replicas)
            if holder is not None:
                return [[holder]]
        avoid = tuple(pending_request.kwargs.get("avoid", ())) if pending_request is not None else ()
        ranks = rank_new(candidate_replicas, self._placed(exclude=sid), avoid)
        if sid is not None and method == OPEN and ranks:
            self._tentative[sid] = ranks[0][0].replica_id  # counted at once, so a concurrent open goes elsewhere
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        sid = session_of(pending_request)
        if sid is None:
            return
        method = pending_request.metadata.call_method
        if method == OPEN:
            self._tentative.pop(sid, None)
            self._where[sid] = replica_id
        elif method == CLOSE:
            self._where.pop(sid, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(lambda rid: rid == replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        alive = {r.replica_id for r in replicas}
        self._forget(lambda rid: rid not in alive)

    def _forget(self, gone) -> None:
        where = getattr(self, "_where", None)
        if where is None:  # update_replicas may run before initialize_state
            return
        for table in (where, self._tentative):
            for sid in [s for s, rid in table.items() if gone(rid)]:
                del table[sid]
