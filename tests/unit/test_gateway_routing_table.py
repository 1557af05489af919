"""The routing table: versioned snapshots, replica reuse and retirement, static tables."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from gateway.replica_client import ReplicaClient
from gateway.routing_table import RoutingTable, static_table
from mss.config import ClusterConfig, parse_config
from protos import controller_pb2


class FakeClient(ReplicaClient):
    """A ReplicaClient that never dials: started means healthy."""

    started: list[str] = []

    def start(self) -> None:
        FakeClient.started.append(self.replica_id)
        self.stats.healthy = True

    async def close_when_idle(self, deadline_s: float) -> None:
        await self.close()


def table(version: int, *models: tuple[str, str, list[tuple[str, str]]], **limits: Any) -> Any:
    t = controller_pb2.RoutingTable(version=version)
    for name, strategy, routes in models:
        m = t.models.add(model=name, strategy=strategy, **limits)
        for rid, addr in routes:
            m.routes.add(replica_id=rid, address=addr)
    return t


async def test_apply_versions_reuse_and_retire() -> None:
    rt = RoutingTable(client_factory=FakeClient)
    assert not rt.ready()
    rt.apply(table(2, ("a", "round_robin", [("a1", "h:1"), ("a2", "h:2")]), max_in_flight=10))
    assert rt.version == 2 and rt.ready()
    router = rt.get("a")
    assert router is not None and router.strategy_name == "round_robin"
    assert router.admission.max_in_flight == 10 and router.admission.max_queue == 1024
    a1 = router.clients["a1"]

    rt.apply(table(1, ("b", "", [("b1", "h:3")])))  # older: ignored
    assert rt.get("b") is None and rt.version == 2

    rt.apply(table(3, ("a", "least_loaded", [("a1", "h:1"), ("a3", "h:4")])))
    router = rt.get("a")
    assert router is not None
    assert router.clients["a1"] is a1  # same replica, same connection and stats
    assert set(router.clients) == {"a1", "a3"} and router.strategy_name == "least_loaded"
    picks = {router.pick(None, set()).replica_id for _ in range(20)}  # type: ignore[union-attr]
    assert picks <= {"a1", "a3"}

    rt.apply(table(4, ("b", "bogus", [("b1", "h:3")])))
    assert rt.get("a") is None and a1.stats.removed
    b = rt.get("b")
    assert b is not None and b.strategy_name == "prefix_aware"  # unknown strategy: default
    await rt.close()


async def test_gauges_show_each_replicas_last_report() -> None:
    rt = RoutingTable(client_factory=FakeClient)
    rt.apply(table(1, ("g", "", [("g1", "h:1")])))
    router = rt.get("g")
    assert router is not None
    router.clients["g1"].stats.prefix_cache_hit_rate = 0.75
    rt.refresh_gauges()
    labels = {"model": "g", "replica": "g1"}
    assert REGISTRY.get_sample_value("mss_gateway_replica_prefix_cache_hit_rate", labels) == 0.75
    await rt.close()


async def test_limits_split_between_workers() -> None:
    rt = RoutingTable(workers=4, client_factory=FakeClient)
    rt.apply(table(1, ("a", "", [("a1", "h:1")]), max_in_flight=10, max_queue=3, max_tokens=77))
    router = rt.get("a")
    assert router is not None
    assert (router.admission.max_in_flight, router.admission.max_queue) == (3, 1)
    assert router.max_tokens == 77
    await rt.close()


def test_static_table_takes_deployment_settings() -> None:
    config = parse_config(
        "deployments:\n"
        "  - {name: smollm2, engine: fake, model: fake, routing: power_of_two,\n"
        "     limits: {max_in_flight: 7, max_queue: 2, max_tokens: 99}}\n"
    )
    t = static_table(
        [("smollm2", "127.0.0.1:1"), ("smollm2", "127.0.0.1:2"), ("other", "127.0.0.1:3")], config
    )
    assert t.version == 1
    by_name = {m.model: m for m in t.models}
    s = by_name["smollm2"]
    assert (s.strategy, s.max_in_flight, s.max_queue, s.max_tokens) == ("power_of_two", 7, 2, 99)
    assert [r.address for r in s.routes] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert by_name["other"].strategy == "prefix_aware" and len(by_name["other"].routes) == 1
    forced = static_table([("other", "127.0.0.1:3")], ClusterConfig(), strategy="random")
    assert forced.models[0].strategy == "random"
    empty = static_table([], config)
    assert [m.model for m in empty.models] == ["smollm2"] and not empty.models[0].routes
