"""`least_connections`: the replica this gateway has the fewest requests on."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.routing.strategy import NO_EXCLUDE, Exclude, ReplicaStats, Strategy, eligible


class LeastConnections(Strategy):
    """Fewest in-flight requests from this gateway; ties go to a random one."""

    name = "least_connections"

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
        blocks: Sequence[int] = (),
    ) -> ReplicaStats | None:
        pool = eligible(candidates, exclude)
        if not pool:
            return None
        low = min(r.in_flight for r in pool)
        return self.rng.choice([r for r in pool if r.in_flight == low])
