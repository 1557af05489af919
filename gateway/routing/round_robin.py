"""`round_robin`: each request to the next eligible replica in the model's list."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from gateway.routing.strategy import NO_EXCLUDE, Exclude, ReplicaStats, Strategy


class RoundRobin(Strategy):
    """Cycles through the candidates, skipping the ineligible; blind to load."""

    name = "round_robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._counter = itertools.count()

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
        blocks: Sequence[int] = (),
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
