"""`prefix_aware` routing: prompt block hashes, the prefix index, the strategy, its plumbing.

The strategy is driven with plain `ReplicaStats`; the router and the
generation path with the in-memory replicas of `test_gateway_generation`.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from gateway import metrics
from gateway.api_models import GenerationInput
from gateway.prefix_index import MAX_BLOCKS, PrefixIndex, prompt_blocks, render_chat
from gateway.routing import PrefixAware, ReplicaStats, make_strategy
from gateway.routing_table import RoutingTable
from mss.config import ClusterConfig, PrefixRouting
from protos import controller_pb2, replica_pb2
from tests.unit.test_gateway_generation import (
    FakeHttp,
    FakeReplica,
    generation,
    service,
    start,
    until,
)

BLOCK = 32
SYSTEM = "You are a careful assistant. " * 40  # 1,160 characters: 36 blocks and more


def chat(*contents: str, tools: str = "") -> GenerationInput:
    roles = ["system", "user", "assistant"]
    messages = [
        replica_pb2.ChatMessage(role=roles[0] if i == 0 else roles[1 + (i + 1) % 2], content=c)
        for i, c in enumerate(contents)
    ]
    return GenerationInput(messages=messages, tools_json=tools)


def blocks_of(*contents: str) -> list[int]:
    return prompt_blocks(chat(*contents), BLOCK)


# Blocks


def test_text_prompts_sharing_a_prefix_share_its_whole_blocks() -> None:
    shared = "x" * (3 * BLOCK + 5)
    a = prompt_blocks(GenerationInput(prompt=shared + "a" * 100), BLOCK)
    b = prompt_blocks(GenerationInput(prompt=shared + "b" * 100), BLOCK)
    assert len(a) == len(b) == (3 * BLOCK + 105) // BLOCK
    assert a[:3] == b[:3]
    assert all(x != y for x, y in zip(a[3:], b[3:], strict=True))  # chained: all later differ


def test_only_whole_blocks_count_and_at_most_max_blocks() -> None:
    def count(n: int) -> int:
        return len(prompt_blocks(GenerationInput(prompt="p" * n), BLOCK))

    assert (count(0), count(BLOCK - 1), count(BLOCK), count(2 * BLOCK - 1)) == (0, 0, 1, 1)
    assert count((MAX_BLOCKS + 3) * 16) == (MAX_BLOCKS + 3) * 16 // BLOCK
    assert len(prompt_blocks(GenerationInput(prompt="p" * (MAX_BLOCKS + 3) * 16), 16)) == (
        MAX_BLOCKS
    )


def test_a_change_in_message_k_changes_only_the_blocks_after_its_start() -> None:
    turns = [SYSTEM, "What is a prefix cache? " * 5, "It keeps keys and values. " * 5, "More?"]
    base = blocks_of(*turns)
    before_turn_2 = len(render_chat(chat(*turns[:2]))) // BLOCK
    assert before_turn_2 > 0
    edited = blocks_of(*turns[:2], turns[2].replace("keys", "KEYS"), turns[3])
    assert edited[:before_turn_2] == base[:before_turn_2]
    assert all(x != y for x, y in zip(edited[before_turn_2:], base[before_turn_2:], strict=True))


def test_a_growing_conversation_keeps_its_blocks() -> None:
    turns = [SYSTEM, "first question " * 9, "first answer " * 9, "second question"]
    shorter = blocks_of(*turns[:2])
    assert blocks_of(*turns)[: len(shorter)] == shorter


def test_tools_render_first_and_every_field_counts() -> None:
    assert blocks_of(SYSTEM)[0] != prompt_blocks(chat(SYSTEM, tools='[{"name": "f"}]'), BLOCK)[0]
    a = replica_pb2.ChatMessage(role="user", content="ab", name="")
    b = replica_pb2.ChatMessage(role="user", content="a", name="b")
    c = replica_pb2.ChatMessage(role="tool", content="ab", tool_call_id="call_1")
    renderings = {render_chat(GenerationInput(messages=[m])) for m in (a, b, c)}
    assert len(renderings) == 3  # length-prefixed fields: no two messages render alike
    # A text prompt that spells a chat's rendering is still another prompt.
    rendering = render_chat(chat(SYSTEM))
    assert prompt_blocks(GenerationInput(prompt=rendering), BLOCK)[0] != blocks_of(SYSTEM)[0]


def test_token_id_prompts_are_cut_every_quarter_block_of_ids() -> None:
    size = BLOCK // 4
    ids = list(range(5 * size + 3))
    a = prompt_blocks(GenerationInput(prompt_token_ids=ids), BLOCK)
    b = prompt_blocks(GenerationInput(prompt_token_ids=[*ids[: 3 * size], 99_999, *ids]), BLOCK)
    assert len(a) == 5
    assert a[:3] == b[:3] and a[3] != b[3]


# The index


def test_match_is_the_leading_run_each_replica_holds() -> None:
    index = PrefixIndex(100)
    index.record("r1", [1, 2, 3])
    index.record("r2", [1, 2, 4])
    assert index.match([1, 2, 3, 5], ["r1", "r2"]) == {"r1": 3, "r2": 2}
    assert index.match([1, 2, 3], ["r2"]) == {"r2": 2}  # only the replicas asked about
    assert index.match([9, 1, 2], ["r1", "r2"]) == {}  # nobody holds the first block
    assert index.match([1, 2, 3], ["r3"]) == {}
    assert index.match([], ["r1"]) == {}
    assert len(index) == 6  # blocks 1 and 2 are held by both


def test_eviction_keeps_the_bound_and_forgets_deepest_blocks_first() -> None:
    index = PrefixIndex(5)
    index.record("r1", [1, 2, 3])
    index.record("r2", [7, 8, 9])
    assert len(index) == 5
    assert index.match([1, 2, 3], ["r1"]) == {"r1": 2}  # block 3 went first, 1 and 2 stay
    index.record("r1", [1, 2, 3])  # sent again: refreshed, others evicted
    assert len(index) == 5 and index.match([1, 2, 3], ["r1"]) == {"r1": 3}
    assert index.match([7, 8, 9], ["r2"]) == {"r2": 2}
    for i in range(100):
        index.record(f"r{i % 3}", [100 + i, 200 + i])
        assert len(index) <= 5


def test_remove_replica_drops_its_entries_only() -> None:
    index = PrefixIndex(100)
    index.record("r1", [1, 2, 3])
    index.record("r2", [1, 2])
    index.remove_replica("r1")
    assert len(index) == 2 and index.replica_ids == {"r2"}
    assert index.match([1, 2, 3], ["r1", "r2"]) == {"r2": 2}
    index.remove_replica("r2")
    assert len(index) == 0 and index.match([1], ["r2"]) == {}


# The strategy


class Decisions:
    """The strategy's decisions, as the gateway's metrics hook sees them."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.fractions: list[float | None] = []

    def __call__(self, reason: str, fraction: float | None) -> None:
        self.reasons.append(reason)
        self.fractions.append(fraction)


def prefix_aware(**settings: Any) -> tuple[PrefixAware, Decisions]:
    strategy = PrefixAware(random.Random(4), PrefixRouting(block_chars=BLOCK, **settings))
    decisions = strategy.on_decision = Decisions()
    return strategy, decisions


def replicas(n: int) -> list[ReplicaStats]:
    return [ReplicaStats(f"r{i}", max_in_flight=100) for i in range(n)]


def send(strategy: PrefixAware, pool: list[ReplicaStats], blocks: list[int], to: str) -> None:
    """Route `blocks` to replica `to` (the others excluded), so that it holds them."""
    others = {r.replica_id for r in pool} - {to}
    chosen = strategy.choose(pool, exclude=others, blocks=blocks)
    assert chosen is not None and chosen.replica_id == to


def choose(strategy: PrefixAware, pool: list[ReplicaStats], blocks: list[int], **kw: Any) -> str:
    chosen = strategy.choose(pool, blocks=blocks, **kw)
    assert chosen is not None
    return chosen.replica_id


def test_the_longest_match_wins() -> None:
    strategy, decisions = prefix_aware()
    pool = replicas(3)
    prompt = blocks_of(SYSTEM, "a question")
    send(strategy, pool, prompt[:4], "r0")
    send(strategy, pool, prompt[:12], "r1")
    pool[1].in_flight = 2  # busier (within the absolute bound, 2), but holds more
    assert choose(strategy, pool, prompt) == "r1"
    assert decisions.reasons[-1] == "match"
    assert decisions.fractions[-1] == 12 / len(prompt)
    assert strategy.index.match(prompt, ["r1"]) == {"r1": len(prompt)}  # recorded on dispatch


def test_equal_matches_go_to_the_least_loaded() -> None:
    strategy, _ = prefix_aware()
    pool = replicas(3)
    prompt = blocks_of(SYSTEM)
    send(strategy, pool, prompt, "r0")
    send(strategy, pool, prompt, "r1")
    pool[0].in_flight = 2
    assert choose(strategy, pool, prompt) == "r1"
    pool[1].in_flight = 4
    assert choose(strategy, pool, prompt) == "r0"


def test_imbalance_needs_both_thresholds_then_goes_least_loaded() -> None:
    strategy, decisions = prefix_aware(balance_abs_threshold=8, balance_rel_threshold=1.5)
    pool = [ReplicaStats(f"r{i}", max_in_flight=1000) for i in range(2)]
    prompt = blocks_of(SYSTEM)
    send(strategy, pool, prompt, "r0")

    pool[0].in_flight, pool[1].in_flight = 110, 100  # 10 apart, but only 1.1x
    assert choose(strategy, pool, prompt) == "r0" and decisions.reasons[-1] == "match"
    pool[0].in_flight, pool[1].in_flight = 6, 0  # any ratio, but only 6 apart
    assert choose(strategy, pool, prompt) == "r0" and decisions.reasons[-1] == "match"
    pool[0].in_flight, pool[1].in_flight = 15, 5  # 10 apart and 3x
    assert choose(strategy, pool, prompt) == "r1" and decisions.reasons[-1] == "imbalanced"
    assert decisions.fractions[-1] == 1.0  # what r0 held, too busy to take it
    pool[0].in_flight, pool[0].waiting = 0, 15  # the replica's waiting requests count too
    strategy.index.remove_replica("r1")  # (r1 was just sent the prompt)
    assert choose(strategy, pool, prompt) == "r1" and decisions.reasons[-1] == "imbalanced"
    # An ineligible replica's load does not count.
    pool[0].waiting, pool[1].in_flight, pool[1].healthy = 0, 50, False
    pool.append(ReplicaStats("r2", max_in_flight=1000))
    assert choose(strategy, pool, prompt) == "r0" and decisions.reasons[-1] == "match"


def test_a_match_below_the_minimum_ratio_goes_least_loaded() -> None:
    strategy, decisions = prefix_aware(min_match_ratio=0.1)
    pool = replicas(2)
    prompt = blocks_of(SYSTEM, "q" * 20 * BLOCK)[:20]
    send(strategy, pool, prompt[:1], "r0")
    pool[0].in_flight = 2
    assert choose(strategy, pool, prompt) == "r1"
    assert decisions.reasons[-1] == "no_match" and decisions.fractions[-1] == 1 / 20
    other = blocks_of("another system prompt " * 20)[:20]
    send(strategy, pool, other[:2], "r0")
    assert choose(strategy, pool, other) == "r0"  # 2 of 20 blocks: 10 %, enough
    assert decisions.reasons[-1] == "match"


def test_no_blocks_goes_least_loaded() -> None:
    strategy, decisions = prefix_aware()
    pool = replicas(2)
    pool[0].in_flight = 1
    assert choose(strategy, pool, []) == "r1"
    assert decisions.reasons == ["no_match"] and len(strategy.index) == 0


def test_excluded_unhealthy_and_full_replicas_are_never_chosen() -> None:
    strategy, _ = prefix_aware()
    pool = replicas(3)
    prompt = blocks_of(SYSTEM)
    send(strategy, pool, prompt, "r0")
    assert choose(strategy, pool, prompt, exclude={"r0"}) != "r0"
    pool[0].healthy = False
    assert choose(strategy, pool, prompt) != "r0"
    pool[0].healthy, pool[0].in_flight = True, 100  # full
    assert choose(strategy, pool, prompt) != "r0"
    pool[0].in_flight, pool[0].removed = 0, True
    assert choose(strategy, pool, prompt) != "r0"
    assert strategy.choose(pool, exclude={"r1", "r2"}, blocks=prompt) is None
    assert strategy.choose([], blocks=prompt) is None


def test_replicas_changed_drops_the_entries_of_replicas_gone() -> None:
    strategy, _ = prefix_aware()
    pool = replicas(3)
    prompt = blocks_of(SYSTEM)
    send(strategy, pool, prompt, "r0")
    send(strategy, pool, prompt, "r1")
    held = len(strategy.index)
    strategy.replicas_changed(pool[1:])
    assert strategy.index.replica_ids == {"r1"} and len(strategy.index) == held // 2
    assert strategy.index.match(prompt, ["r0", "r1"]) == {"r1": len(prompt)}


def test_a_conversation_that_grows_keeps_its_replica() -> None:
    strategy, decisions = prefix_aware()
    pool = replicas(4)
    rng = random.Random(2)
    conversations: dict[int, list[str]] = {
        c: [f"System prompt of tenant {c}. " * 30] for c in range(8)
    }
    homes: dict[int, set[str]] = {c: set() for c in conversations}
    for turn in range(5):
        for c, turns in conversations.items():
            turns.append(f"user turn {turn} of {c}: " + "words " * rng.randrange(5, 40))
            chosen = strategy.choose(pool, blocks=blocks_of(*turns))
            assert chosen is not None
            chosen.in_flight += 1  # each leaves one request running: two per replica a turn
            homes[c].add(chosen.replica_id)
            turns.append("assistant answer " * rng.randrange(1, 30))
    assert all(len(home) == 1 for home in homes.values()), homes
    assert len(set().union(*homes.values())) > 1  # first turns spread over the replicas
    assert decisions.reasons.count("match") == 8 * 4


def test_other_strategies_take_and_ignore_blocks() -> None:
    pool = replicas(2)
    for name in ("round_robin", "least_loaded", "session_affinity", "power_of_two"):
        strategy = make_strategy(name, random.Random(1))
        assert not strategy.wants_blocks
        assert strategy.choose(pool, None, set(), [1, 2]) is not None
    assert make_strategy("prefix_aware").wants_blocks


def test_make_strategy_hands_prefix_aware_the_gateway_settings() -> None:
    settings = PrefixRouting(max_index_entries=7, min_match_ratio=0.5)
    strategy = make_strategy("prefix_aware", prefix_routing=settings)
    assert isinstance(strategy, PrefixAware) and strategy.settings is settings
    assert strategy.index.max_entries == 7
    assert ClusterConfig().gateway.prefix_routing == PrefixRouting()


# The router and the request path


def routes(version: int, model: str, strategy: str, n: int = 3) -> controller_pb2.RoutingTable:
    table = controller_pb2.RoutingTable(version=version)
    m = table.models.add(model=model, strategy=strategy)
    for i in range(n):
        m.routes.add(replica_id=f"{model}-{i}", address=f"fake:{i}")
    return table


@pytest.fixture
async def table() -> AsyncIterator[RoutingTable]:
    table = RoutingTable(client_factory=FakeReplica, prefix_routing=PrefixRouting(block_chars=64))
    try:
        yield table
    finally:
        await table.close()


def count(model: str, reason: str) -> float:
    metrics.flush()  # the exported value, as a scrape sees it
    value = REGISTRY.get_sample_value(
        "mss_gateway_prefix_routing_total", {"model": model, "reason": reason}
    )
    return value or 0.0


async def test_router_sends_a_shared_system_prompt_to_one_replica(table: RoutingTable) -> None:
    table.apply(routes(1, "pa-router", "prefix_aware"))
    router = table.get("pa-router")
    assert router is not None and isinstance(router.strategy, PrefixAware)
    assert router.strategy.settings is table.prefix_routing
    first = router.prompt_blocks(chat(SYSTEM, "What is 2 + 2?"))
    second = router.prompt_blocks(chat(SYSTEM, "Name a prime number."))
    assert len(first) == len(render_chat(chat(SYSTEM, "What is 2 + 2?"))) // 64
    a = router.pick(None, set(), first)
    assert a is not None
    a.stats.in_flight += 1  # still running: the others are less loaded
    b = router.pick(None, set(), second)
    assert b is a
    assert count("pa-router", "match") == 1 and count("pa-router", "no_match") == 1

    table.apply(routes(2, "pa-router", "prefix_aware", n=2))  # pa-router-2 left
    assert router.strategy.index.replica_ids <= {"pa-router-0", "pa-router-1"}


async def test_other_strategies_pay_nothing_and_a_switch_brings_the_settings(
    table: RoutingTable,
) -> None:
    table.apply(routes(1, "pa-switch", "least_loaded"))
    router = table.get("pa-switch")
    assert router is not None
    assert router.prompt_blocks(chat(SYSTEM)) == ()
    table.apply(routes(2, "pa-switch", "prefix_aware"))
    assert router.strategy_name == "prefix_aware" and router.prompt_blocks(chat(SYSTEM))
    assert isinstance(router.strategy, PrefixAware)
    assert router.strategy.settings is table.prefix_routing


async def test_requests_retries_and_migrations_route_with_the_prompts_blocks(
    table: RoutingTable,
) -> None:
    table.apply(routes(1, "pa-run", "prefix_aware"))
    router = table.get("pa-run")
    assert router is not None and isinstance(router.strategy, PrefixAware)
    index = router.strategy.index
    fakes = {rid: c for rid, c in router.clients.items() if isinstance(c, FakeReplica)}
    svc = service()

    def running() -> FakeReplica | None:
        return next((f for f in fakes.values() if f.sinks and not f.sinks[-1].ended), None)

    async def on_replica(what: str, avoid: str = "") -> FakeReplica:
        await until(lambda: (r := running()) is not None and r.replica_id != avoid, what)
        replica = running()
        assert replica is not None
        return replica

    async def run(question: str, fail_first: bool = False) -> list[str]:
        inp = chat(SYSTEM, question)
        http = FakeHttp()
        task = start(svc, router, http, generation("pa-run", inp=inp))
        replica = await on_replica("the request reaching a replica")
        used = [replica.replica_id]
        if fail_first:  # before the first token: retried elsewhere
            replica.fail(grpc.StatusCode.UNAVAILABLE)
            replica = await on_replica("the retry", avoid=replica.replica_id)
            used.append(replica.replica_id)
        replica.say("Hel")
        await until(lambda: len(http.messages) > 1, "the first token")
        replica.stats.healthy = False  # what a broken stream does to a replica
        replica.fail(grpc.StatusCode.UNAVAILABLE)  # after the first token: migrates
        broken, replica = replica, await on_replica("the migration", avoid=replica.replica_id)
        used.append(replica.replica_id)
        replica.say("lo", finish="stop", usage=(3, 2))
        assert await task == 200
        broken.stats.healthy = True  # back after a probe
        blocks = router.prompt_blocks(inp)
        assert set(index.match(blocks, used)) == set(used)  # each pick got the blocks
        return used

    first = await run("Why is the sky blue?", fail_first=True)
    assert len(set(first)) >= 2
    second = await run("Why is grass green?")
    # Both replicas the request ended on and the one that failed it hold the prompt; the
    # next request with the same system prompt goes to one of them.
    assert second[0] in first


def test_a_busy_holder_gives_way_to_the_next_longest_prefix() -> None:
    strategy, decisions = prefix_aware(balance_abs_threshold=2, balance_rel_threshold=1.5)
    pool = replicas(3)
    prompt = blocks_of(SYSTEM, "a question")
    send(strategy, pool, prompt, "r0")
    send(strategy, pool, prompt[:6], "r1")
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 5, 2, 1
    # r0 holds it all but is 4 above the least loaded (and 5x): r1 holds the most of the rest.
    assert choose(strategy, pool, prompt) == "r1" and decisions.reasons[-1] == "imbalanced"
    pool[1].in_flight = 4  # now r1 is too busy as well: the least busy takes it
    assert choose(strategy, pool, prompt) == "r2" and decisions.reasons[-1] == "imbalanced"


def test_with_hundreds_of_streams_the_relative_bound_rules() -> None:
    strategy, decisions = prefix_aware(balance_abs_threshold=2, balance_rel_threshold=1.5)
    pool = replicas(2)
    prompt = blocks_of(SYSTEM)
    send(strategy, pool, prompt, "r0")
    pool[0].in_flight, pool[1].in_flight = 60, 45  # 15 above, but within 1.5x
    assert choose(strategy, pool, prompt) == "r0" and decisions.reasons[-1] == "match"
    pool[0].in_flight = 70  # past 1.5x too
    assert choose(strategy, pool, prompt) == "r1" and decisions.reasons[-1] == "imbalanced"


def test_the_fallback_counts_requests_before_kv_cache_use() -> None:
    # The gateway's in-flight count is exact at once; a replica busy prefilling reports
    # nothing new, so its KV-cache use lags. Requests decide, KV-cache use breaks ties.
    strategy, _ = prefix_aware()
    pool = [ReplicaStats(f"r{i}", max_in_flight=512) for i in range(2)]
    pool[0].kv_cache_usage, pool[1].in_flight = 0.5, 3
    assert choose(strategy, pool, []) == "r0"
    pool[1].in_flight = 0
    assert choose(strategy, pool, []) == "r1"
