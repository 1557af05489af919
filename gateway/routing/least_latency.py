"""`least_latency`: the replica with the lowest moving-average time to first token."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.routing.strategy import NO_EXCLUDE, Exclude, ReplicaStats, Strategy, eligible


class LeastLatency(Strategy):
    """Lowest moving-average TTFT; replicas with no sample yet go first so they get one."""

    name = "least_latency"

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
        unsampled = [r for r in pool if r.ttft_ewma is None]
        if unsampled:
            return min(unsampled, key=lambda r: r.in_flight)
        return min(pool, key=lambda r: (r.ttft_ewma, r.in_flight))
