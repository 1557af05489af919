"""Each routing strategy chooses as specified, on plain stats (no I/O)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.routing import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    ReplicaStats,
    SessionAffinity,
    Strategy,
    make_strategy,
)
from mss.config import Deployment


def rid(strategy: Strategy, pool: list[ReplicaStats], **kwargs: Any) -> str:
    chosen = strategy.choose(pool, **kwargs)
    assert chosen is not None
    return chosen.replica_id


def replicas(n: int) -> list[ReplicaStats]:
    return [ReplicaStats(f"r{i}", max_in_flight=100) for i in range(n)]


def test_every_strategy_exists_and_refuses_when_nothing_is_eligible() -> None:
    for name in STRATEGIES:
        strategy = make_strategy(name, random.Random(1))
        pool = replicas(3)
        assert strategy.choose(pool) is not None
        for r in pool:
            r.healthy = False
        assert strategy.choose(pool, key="k") is None, name
        assert strategy.choose([]) is None, name
    with pytest.raises(ValueError, match="unknown routing strategy 'nope'"):
        make_strategy("nope")
    assert make_strategy("").name == "prefix_aware"


def test_the_config_accepts_exactly_the_registered_strategies() -> None:
    for name in STRATEGIES:
        assert make_strategy(name).name == name
        assert Deployment(name="m", model="fake", routing=name).routing == name
    assert Deployment(name="m", model="fake").routing == DEFAULT_STRATEGY == "prefix_aware"
    with pytest.raises(ValidationError) as info:
        Deployment(name="m", model="fake", routing="fastest")
    message = str(info.value)
    assert "'fastest'" in message and all(name in message for name in STRATEGIES)


def test_round_robin_cycles_and_skips_unhealthy_and_excluded() -> None:
    rr = make_strategy("round_robin")
    pool = replicas(3)
    assert [rid(rr, pool) for _ in range(6)] == ["r0", "r1", "r2"] * 2
    pool[1].healthy = False
    picks = {rid(rr, pool) for _ in range(6)}
    assert picks == {"r0", "r2"}
    assert rr.choose(pool, exclude={"r0", "r2"}) is None


def test_random_spreads_over_eligible_only() -> None:
    strategy = make_strategy("random", random.Random(7))
    pool = replicas(4)
    pool[3].removed = True
    counts = Counter(rid(strategy, pool) for _ in range(600))
    assert set(counts) == {"r0", "r1", "r2"}
    assert min(counts.values()) > 120


def test_least_connections_picks_fewest_in_flight() -> None:
    strategy = make_strategy("least_connections", random.Random(0))
    pool = replicas(3)
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 5, 2, 9
    assert rid(strategy, pool) == "r1"
    assert rid(strategy, pool, exclude={"r1"}) == "r0"


def test_full_replicas_are_skipped() -> None:
    strategy = make_strategy("least_connections")
    pool = replicas(2)
    pool[0].in_flight = 0
    pool[0].max_in_flight = 0  # unknown capacity: never full
    pool[1].in_flight, pool[1].max_in_flight = 3, 3
    assert pool[1].full and not pool[0].full
    assert rid(strategy, pool) == "r0"


def test_least_latency_samples_new_replicas_then_prefers_fastest_ttft() -> None:
    strategy = make_strategy("least_latency")
    pool = replicas(3)
    pool[0].observe_ttft(0.050)
    pool[1].observe_ttft(0.020)
    assert rid(strategy, pool) == "r2"  # no sample yet
    pool[2].observe_ttft(0.300)
    assert rid(strategy, pool) == "r1"
    # The moving average follows new samples: r1 gets slow.
    for _ in range(20):
        pool[1].observe_ttft(1.0)
    assert rid(strategy, pool) == "r0"


def test_ttft_moving_average() -> None:
    r = ReplicaStats("r")
    r.observe_ttft(0.1)
    assert r.ttft_ewma == pytest.approx(0.1)
    r.observe_ttft(0.2)
    assert r.ttft_ewma == pytest.approx(0.1 + 0.2 * 0.1)


def test_least_loaded_scores_in_flight_waiting_and_kv_use() -> None:
    strategy = make_strategy("least_loaded", random.Random(3))
    pool = replicas(3)
    pool[0].in_flight = 10
    pool[1].waiting = 10
    pool[2].kv_cache_usage = 0.9
    # 0.6*10/100=0.06, 0.06, 0.36: r0 and r1 tie, r2 (KV nearly full) loses.
    picks = {rid(strategy, pool) for _ in range(50)}
    assert picks == {"r0", "r1"}
    pool[1].waiting = 30
    assert rid(strategy, pool) == "r0"
    pool[0].in_flight = 100  # full
    assert rid(strategy, pool) == "r1"


def test_power_of_two_never_picks_the_most_loaded_of_three() -> None:
    strategy = make_strategy("power_of_two", random.Random(5))
    pool = replicas(3)
    pool[0].in_flight = 90
    pool[1].in_flight = 10
    pool[2].in_flight = 50
    counts = Counter(rid(strategy, pool) for _ in range(300))
    assert "r0" not in counts
    assert counts["r1"] > counts["r2"]
    assert rid(strategy, pool[:1]) == "r0"


def test_session_affinity_is_sticky_and_falls_back_to_the_next_replica() -> None:
    strategy = make_strategy("session_affinity")
    pool = replicas(4)
    keys = [f"user-{i}" for i in range(200)]
    first = {k: rid(strategy, pool, key=k) for k in keys}
    assert len(set(first.values())) == 4  # spread over all replicas
    again = {k: rid(strategy, pool, key=k) for k in keys}
    assert again == first

    # r2 unhealthy: only its keys move, each to one fixed replica.
    pool[2].healthy = False
    moved = {k: rid(strategy, pool, key=k) for k in keys}
    for k in keys:
        if first[k] != "r2":
            assert moved[k] == first[k]
        else:
            assert moved[k] != "r2"
    # Full replicas are skipped the same way; excluded ones too.
    pool[2].healthy = True
    pool[0].in_flight = pool[0].max_in_flight
    for k in keys:
        choice = rid(strategy, pool, key=k)
        assert choice != "r0"
        if first[k] != "r0":
            assert choice == first[k]
    k = next(k for k in keys if first[k] == "r1")
    assert rid(strategy, pool, key=k, exclude={"r1"}) not in ("r1", "r0")


def test_session_affinity_moves_few_keys_when_a_replica_joins() -> None:
    strategy = SessionAffinity()
    pool = replicas(4)
    keys = [f"s{i}" for i in range(400)]
    before = {k: rid(strategy, pool, key=k) for k in keys}
    pool.append(ReplicaStats("r4", max_in_flight=100))
    after = {k: rid(strategy, pool, key=k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "r4" for k in moved)
    assert 0 < len(moved) < 0.4 * len(keys)


def test_session_affinity_without_key_is_least_loaded() -> None:
    strategy = make_strategy("session_affinity")
    pool = replicas(2)
    pool[0].in_flight = 50
    assert rid(strategy, pool, key=None) == "r1"
