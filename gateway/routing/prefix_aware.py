"""`prefix_aware`: the replica that was sent the longest prefix of the prompt, unless the
load is uneven.

Like SGLang's cache-aware router and Ray Serve's PrefixCacheAffinityRouter: a
request whose prompt starts like one a replica was sent recently (the same
system prompt, tools or few-shot examples, an earlier turn of the same
conversation) goes to that replica, whose prefix cache likely still holds
the prompt's keys and values, so it skips their prefill. Balance bounds
affinity: a replica takes a request for its prefix only while its load is
within the thresholds of the least loaded replica's (bounded-load consistent
hashing does the same), so a popular prefix spreads instead of piling onto
one replica; when no replica holds enough of the prompt, the least loaded
one takes the request.

The index (`gateway.prefix_index.PrefixIndex`) is per model and per gateway
process, updated as each request is dispatched; nothing is shared or
persisted, so a new process starts cold and learns within a few requests.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gateway.prefix_index import PrefixIndex
from gateway.routing.strategy import NO_EXCLUDE, Exclude, ReplicaStats, Strategy, eligible

if TYPE_CHECKING:
    from mss.config import PrefixRouting

REASONS = ("match", "imbalanced", "no_match")
"""Why a replica was chosen: it held the longest prefix; the ones holding it were too busy
(the longest prefix among the others, or the least busy); no replica held enough of the
prompt (the least busy)."""

DecisionHook = Callable[[str, float | None], None]
"""Called with each decision's reason and the best matched fraction of the prompt's blocks."""


class PrefixAware(Strategy):
    """Longest prefix match among the eligible replicas, least loaded when the load is uneven.

    Load here is this gateway's in-flight requests on a replica plus the
    waiting requests it reported: the in-flight count is exact the moment a
    request is sent, where the replica's own numbers arrive only with its next
    output (none while it prefills a long prompt). Ties between equally long
    matches, and every fallback, go to the lowest load, then the lowest
    KV-cache use, then at random. (`least_loaded`'s score weighs requests
    against a replica's admission capacity, hundreds, so KV-cache use decides
    it at the loads a CPU replica runs; measured in docs/benchmarks.md, it
    stacks long prefills on one replica.) The chosen replica is recorded with
    the request's blocks, so the next request with that prefix follows it.
    """

    name = "prefix_aware"
    wants_blocks = True

    def __init__(
        self, rng: random.Random | None = None, settings: PrefixRouting | None = None
    ) -> None:
        super().__init__(rng)
        if settings is None:
            # Imported here: mss.config imports the routing registry, which imports this module.
            from mss.config import PrefixRouting

            settings = PrefixRouting()
        self.settings = settings
        self.index = PrefixIndex(settings.max_index_entries)
        self.on_decision: DecisionHook | None = None
        """Set by the gateway to count decisions; strategies themselves export nothing."""

    def replicas_changed(self, candidates: Sequence[ReplicaStats]) -> None:
        present = {r.replica_id for r in candidates}
        for replica_id in self.index.replica_ids - present:
            self.index.remove_replica(replica_id)

    def choose(
        self,
        candidates: Sequence[ReplicaStats],
        key: str | None = None,
        exclude: Exclude = NO_EXCLUDE,
        blocks: Sequence[int] = (),
    ) -> ReplicaStats | None:
        pool = eligible(candidates, exclude)
        shortlist, reason, fraction = self._shortlist(pool, blocks)
        chosen = self._least_busy(shortlist)
        if chosen is None:
            return None
        if blocks:
            self.index.record(chosen.replica_id, blocks)
        if self.on_decision is not None:
            self.on_decision(reason, fraction)
        return chosen

    def _shortlist(
        self, pool: list[ReplicaStats], blocks: Sequence[int]
    ) -> tuple[list[ReplicaStats], str, float | None]:
        """The replicas the least busy is chosen from, why, and the best matched fraction.

        The replicas that hold the longest prefix, when one of them has room: a load
        within the thresholds of the least loaded replica's. When none has, the
        longest prefix among those that have room ("imbalanced"). When no replica
        holds enough of the prompt, all of them ("no_match").
        """
        if not blocks or not pool:
            return pool, "no_match", 0.0
        matched = self.index.match(blocks, [r.replica_id for r in pool])
        best = max(matched.values(), default=0)
        fraction = best / len(blocks)
        if best == 0 or fraction < self.settings.min_match_ratio:
            return pool, "no_match", fraction
        low = min(_load(r) for r in pool)
        roomy = [r for r in pool if self._has_room(_load(r), low)]
        holders = [r for r in roomy if matched.get(r.replica_id, 0) == best]
        if holders:
            return holders, "match", fraction
        second = max(matched.get(r.replica_id, 0) for r in roomy)
        if second and second / len(blocks) >= self.settings.min_match_ratio:
            return (
                [r for r in roomy if matched.get(r.replica_id, 0) == second],
                "imbalanced",
                fraction,
            )
        return roomy, "imbalanced", fraction

    def _least_busy(self, pool: list[ReplicaStats]) -> ReplicaStats | None:
        if len(pool) <= 1:
            return pool[0] if pool else None
        low = min(_load(r) for r in pool)
        best = [r for r in pool if _load(r) == low]
        if len(best) > 1:
            kv = min(r.kv_cache_usage for r in best)
            best = [r for r in best if r.kv_cache_usage == kv]
        return best[0] if len(best) == 1 else self.rng.choice(best)

    def _has_room(self, load: int, low: int) -> bool:
        """Whether a replica this loaded may take a request for its prefix, the least loaded
        eligible replica having `low`: uneven is more than the absolute threshold above
        it and more than the relative threshold times it."""
        settings = self.settings
        return load - low <= settings.balance_abs_threshold or (
            load <= settings.balance_rel_threshold * low
        )


def _load(replica: ReplicaStats) -> int:
    return replica.in_flight + replica.waiting
