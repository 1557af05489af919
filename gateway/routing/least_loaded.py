"""`least_loaded`: the replica with the lowest `ReplicaStats.load_score`."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.routing.strategy import NO_EXCLUDE, Exclude, ReplicaStats, Strategy, eligible


class LeastLoaded(Strategy):
    """Lowest `load_score`; ties go to a random one so equal replicas share the load."""

    name = "least_loaded"

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
        if len(pool) == 1:
            return pool[0]
        scores = [r.load_score() for r in pool]
        low = min(scores)
        best = [r for r, s in zip(pool, scores, strict=True) if s == low]
        return best[0] if len(best) == 1 else self.rng.choice(best)
