"""`power_of_two`: two random replicas, the less loaded of the two.

Nearly as good as scanning every replica for the least loaded, and it does not
send every gateway's next request to the same replica between load reports.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.routing.strategy import NO_EXCLUDE, Exclude, ReplicaStats, Strategy, eligible


class PowerOfTwo(Strategy):
    """Two eligible replicas at random, the one with the lower `load_score`."""

    name = "power_of_two"

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
        blocks: Sequence[int] = (),
    ) -> ReplicaStats | None:
        pool = eligible(candidates, exclude)
        if len(pool) <= 1:
            return pool[0] if pool else None
        a, b = self.rng.sample(pool, 2)
        return a if a.load_score() <= b.load_score() else b
