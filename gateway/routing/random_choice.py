"""`random`: a uniformly random eligible replica.

(The module is not called `random` so that it never shadows the standard library's.)
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.routing.strategy import NO_EXCLUDE, Exclude, ReplicaStats, Strategy, eligible


class Random(Strategy):
    """Any eligible replica, each as likely; blind to load."""

    name = "random"

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
        blocks: Sequence[int] = (),
    ) -> ReplicaStats | None:
        pool = eligible(candidates, exclude)
        return self.rng.choice(pool) if pool else None
