"""Replica choice: the routing strategies, pure and synchronous.

Each strategy picks one replica out of a model's candidates from numbers the
gateway already holds (`ReplicaStats`): its own in-flight count, the moving
average of time to first token, and the load the replica reported on its last
reply. Nothing here does I/O, so unit tests drive it with plain stats.

A replica is eligible when it is healthy, not full and not excluded (the
replicas a request already failed on). Strategies never return an ineligible
replica; None means no replica can take the request now.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

STRATEGIES = (
    "round_robin",
    "random",
    "least_connections",
    "least_latency",
    "least_loaded",
    "power_of_two",
    "session_affinity",
)
DEFAULT_STRATEGY = "least_loaded"
TTFT_EWMA_ALPHA = 0.2
"""Weight of the newest time-to-first-token sample in the moving average."""
SESSION_WEIGHT = 0.6
KV_WEIGHT = 0.4
"""Least-loaded score: 60% request load, 40% KV-cache use."""
VIRTUAL_NODES = 64
"""Points per replica on the consistent-hash ring."""

Exclude = frozenset[str] | set[str]
NO_EXCLUDE: frozenset[str] = frozenset()


@dataclass(slots=True, eq=False)
class ReplicaStats:
    """What routing knows of one replica; updated by the replica's client."""

    replica_id: str
    in_flight: int = 0
    """Requests this gateway has on the replica now."""
    ttft_ewma: float | None = None
    """Moving average of time to first token, seconds; None before the first sample."""
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    max_in_flight: int = 0
    """What the replica admits at once, as it last reported (0: unknown)."""
    healthy: bool = True
    removed: bool = False

    @property
    def full(self) -> bool:
        return self.max_in_flight > 0 and self.in_flight >= self.max_in_flight

    def eligible(self) -> bool:
        return self.healthy and not self.removed and not self.full

    def observe_ttft(self, seconds: float) -> None:
        prev = self.ttft_ewma
        self.ttft_ewma = seconds if prev is None else prev + TTFT_EWMA_ALPHA * (seconds - prev)

    def load_score(self) -> float:
        """Lower is better: request pressure against capacity, plus KV-cache use."""
        capacity = self.max_in_flight or 256
        pressure = (self.in_flight + self.waiting) / capacity
        return SESSION_WEIGHT * pressure + KV_WEIGHT * self.kv_cache_usage


def _eligible(candidates: Sequence[ReplicaStats], exclude: Exclude) -> list[ReplicaStats]:
    return [r for r in candidates if r.eligible() and r.replica_id not in exclude]


class Strategy:
    """Chooses a replica; `candidates` is the model's full list in a stable order."""

    name = ""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
    ) -> ReplicaStats | None:
        raise NotImplementedError

    def replicas_changed(self, candidates: Sequence[ReplicaStats]) -> None:
        """Called when the routing table changes the model's replicas."""


class RoundRobin(Strategy):
    name = "round_robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._counter = itertools.count()

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
    ) -> ReplicaStats | None:
        n = len(candidates)
        if n == 0:
            return None
        start = next(self._counter)
        for i in range(n):
            r = candidates[(start + i) % n]
            if r.eligible() and r.replica_id not in exclude:
                return r
        return None


class Random(Strategy):
    name = "random"

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
    ) -> ReplicaStats | None:
        pool = _eligible(candidates, exclude)
        return self.rng.choice(pool) if pool else None


class LeastConnections(Strategy):
    name = "least_connections"

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
    ) -> ReplicaStats | None:
        pool = _eligible(candidates, exclude)
        if not pool:
            return None
        low = min(r.in_flight for r in pool)
        return self.rng.choice([r for r in pool if r.in_flight == low])


class LeastLatency(Strategy):
    """Lowest moving-average TTFT; replicas with no sample yet go first so they get one."""

    name = "least_latency"

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
    ) -> ReplicaStats | None:
        pool = _eligible(candidates, exclude)
        if not pool:
            return None
        unsampled = [r for r in pool if r.ttft_ewma is None]
        if unsampled:
            return min(unsampled, key=lambda r: r.in_flight)
        return min(pool, key=lambda r: (r.ttft_ewma, r.in_flight))


class LeastLoaded(Strategy):
    """Lowest `load_score`; ties go to a random one so equal replicas share the load."""

    name = "least_loaded"

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
    ) -> ReplicaStats | None:
        pool = _eligible(candidates, exclude)
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0]
        scores = [r.load_score() for r in pool]
        low = min(scores)
        best = [r for r, s in zip(pool, scores, strict=True) if s == low]
        return best[0] if len(best) == 1 else self.rng.choice(best)


class PowerOfTwo(Strategy):
    """Two replicas at random, the less loaded of the two."""

    name = "power_of_two"

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
    ) -> ReplicaStats | None:
        pool = _eligible(candidates, exclude)
        if len(pool) <= 1:
            return pool[0] if pool else None
        a, b = self.rng.sample(pool, 2)
        return a if a.load_score() <= b.load_score() else b


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


_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        Random,
        LeastConnections,
        LeastLatency,
        LeastLoaded,
        PowerOfTwo,
        SessionAffinity,
    )
}


def make_strategy(name: str, rng: random.Random | None = None) -> Strategy:
    """The strategy called `name`; an empty name gives the default (least_loaded)."""
    cls = _CLASSES.get(name or DEFAULT_STRATEGY)
    if cls is None:
        raise ValueError(
            f"unknown routing strategy {name!r}; expected one of {', '.join(STRATEGIES)}"
        )
    return cls(rng)
