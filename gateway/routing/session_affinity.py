"""`session_affinity`: a session key keeps its replica, by consistent hashing.

Requests of one session (the `x-session-id` header, `session_id` or `user`)
go to the same replica, so its prefix cache holds the conversation so far.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence

from gateway.routing.least_loaded import LeastLoaded
from gateway.routing.strategy import NO_EXCLUDE, Exclude, ReplicaStats, Strategy

VIRTUAL_NODES = 64
"""Points per replica on the consistent-hash ring."""


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class SessionAffinity(Strategy):
    """Consistent hashing of the session key onto a ring of replicas.

    A key keeps its replica while the replica set is unchanged; when its
    replica is unhealthy, full or excluded, the next replica clockwise on the
    ring takes it, so only the keys of a missing replica move. Requests with
    no key are routed least-loaded.
    """

    name = "session_affinity"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._points: list[int] = []
        self._owners: list[ReplicaStats] = []
        self._ring_ids: tuple[str, ...] = ()
        self._fallback = LeastLoaded(self.rng)

    def replicas_changed(self, candidates: Sequence[ReplicaStats]) -> None:
        ring = sorted(
            (_hash(f"{r.replica_id}#{i}"), r) for r in candidates for i in range(VIRTUAL_NODES)
        )
        self._points = [p for p, _ in ring]
        self._owners = [r for _, r in ring]
        self._ring_ids = tuple(r.replica_id for r in candidates)

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
        blocks: Sequence[int] = (),
    ) -> ReplicaStats | None:
        if not key:
            return self._fallback.choose(candidates, None, exclude)
        if self._ring_ids != tuple(r.replica_id for r in candidates):
            self.replicas_changed(candidates)
        if not self._points:
            return None
        start = bisect.bisect(self._points, _hash(key))
        n = len(self._points)
        seen: set[str] = set()
        for i in range(n):
            r = self._owners[(start + i) % n]
            if r.replica_id in seen:
                continue
            if r.eligible() and r.replica_id not in exclude:
                return r
            seen.add(r.replica_id)
            if len(seen) == len(candidates):
                break
        return None
