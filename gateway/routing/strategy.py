"""What every routing strategy sees and promises: `ReplicaStats` and the `Strategy` interface.

A strategy picks one replica out of a model's candidates from numbers the
gateway already holds: its own in-flight count, the moving average of time to
first token, and the load the replica reported on its last reply. Nothing in
a strategy does I/O, so unit tests drive it with plain stats.

A replica is eligible when it is healthy, not removed, not full and not
excluded (the replicas a request already failed on). A strategy never returns
an ineligible replica; None means no replica can take the request now.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

TTFT_EWMA_ALPHA = 0.2
"""Weight of the newest time-to-first-token sample in the moving average."""
PRESSURE_WEIGHT = 0.6
KV_WEIGHT = 0.4
"""`load_score`: 60% request pressure (in flight and waiting against capacity), 40% KV-cache use."""
DEFAULT_CAPACITY = 256
"""What `load_score` assumes a replica admits before it has reported its `max_in_flight`."""

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
    prefix_cache_hit_rate: float = 0.0
    """Share of recent prompt tokens the replica's prefix cache held, 0-1, as it last reported."""
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
        capacity = self.max_in_flight or DEFAULT_CAPACITY
        pressure = (self.in_flight + self.waiting) / capacity
        return PRESSURE_WEIGHT * pressure + KV_WEIGHT * self.kv_cache_usage


def eligible(candidates: Sequence[ReplicaStats], exclude: Exclude) -> list[ReplicaStats]:
    """The candidates a request may go to now, in their stable order."""
    return [r for r in candidates if r.eligible() and r.replica_id not in exclude]


class Strategy:
    """Chooses a replica; `candidates` is the model's full list in a stable order.

    One instance per model; the registry (`gateway.routing.registry`) names
    the implementations. `rng` is the only source of randomness, so a test
    that seeds it gets the same choices every run.
    """

    name = ""
    """The name configs and routing tables use; unique within the registry."""
    wants_blocks = False
    """Whether `choose` uses the prompt's block hashes; the gateway computes them only then."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
        blocks: Sequence[int] = (),
    ) -> ReplicaStats | None:
        """An eligible replica not in `exclude`, or None; `key` is the session key, if any,
        `blocks` the prompt's block hashes (`gateway.prefix_index`) when `wants_blocks`."""
        raise NotImplementedError

    def replicas_changed(self, candidates: Sequence[ReplicaStats]) -> None:
        """Called when the routing table changes the model's replicas."""
