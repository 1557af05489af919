"""The gateway's copy of the routing table: models, their limits, strategy and replicas.

It is fed whole `controller_pb2.RoutingTable` snapshots through `apply`, from
the controller's route watcher or, without a controller, once from the static
`--replica` flags (version 1). A snapshot older than or equal to the one held
is ignored. Replicas are matched by id and address: unchanged ones keep their
connection and stats, new ones are probed and join the rotation when ready,
removed ones leave the rotation at once and close when their requests end.

`apply` is synchronous and must run on the event loop (it starts probe tasks).
The data path never waits on the controller: without updates the last table
keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence

from prometheus_client import Counter

from gateway import metrics
from gateway.admission import ModelAdmission
from gateway.api_models import GenerationInput
from gateway.prefix_index import prompt_blocks
from gateway.replica_client import ReplicaClient
from gateway.routing import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    PrefixAware,
    ReplicaStats,
    Strategy,
    make_strategy,
)
from mss.config import ClusterConfig, Deployment, Limits, PrefixRouting
from protos import controller_pb2

log = logging.getLogger(__name__)

REMOVED_REPLICA_GRACE_S = 300.0
"""How long a replica removed from the table may finish the gateway's requests on it."""


class ModelRouter:
    """One model at this gateway: admission bounds, strategy and replica clients."""

    def __init__(
        self, name: str, strategy: str, prefix_routing: PrefixRouting | None = None
    ) -> None:
        self.name = name
        self.prefix_routing = prefix_routing or PrefixRouting()
        self.strategy_name = strategy
        self.strategy: Strategy = self._make_strategy(strategy)
        self.admission = ModelAdmission(name, 1, 0)
        self.max_tokens = Limits().max_tokens
        self.clients: dict[str, ReplicaClient] = {}
        self.candidates: list[ReplicaStats] = []
        self.metrics = metrics.for_model(name)
        self._decisions: dict[str, Counter] = {}
        self.autoscaled = False
        """The controller starts replicas on demand: with none ready, requests are held."""
        self.cold_start_timeout_s = 0.0
        self.unavailable = ""
        """The controller's reason no replica will serve soon (empty: one may)."""
        self.cache_ttl_s = 0.0
        """How long deterministic responses are cached (0: not at all)."""
        self.coalesce = False
        """Identical deterministic requests in flight share one generation."""

    def set_clients(self, clients: dict[str, ReplicaClient]) -> None:
        self.clients = clients
        self.candidates = [c.stats for c in clients.values()]
        self.strategy.replicas_changed(self.candidates)

    def _make_strategy(self, name: str) -> Strategy:
        strategy = make_strategy(name, prefix_routing=self.prefix_routing)
        if isinstance(strategy, PrefixAware):
            strategy.on_decision = metrics.prefix_routing_hook(self.name)
        return strategy

    def use_strategy(self, name: str) -> None:
        """Route with a new strategy called `name`, told the current replicas."""
        self.strategy = self._make_strategy(name)
        self.strategy_name = name
        self.strategy.replicas_changed(self.candidates)
        self.forget_decision_counters()

    def prompt_blocks(self, inp: GenerationInput) -> Sequence[int]:
        """The prompt's block hashes when the strategy routes by them, else () at no cost.

        Computed once per request and passed to each `pick` for it.
        """
        if not self.strategy.wants_blocks:
            return ()
        return prompt_blocks(inp, self.prefix_routing.block_chars)

    def pick(
        self, key: str | None, exclude: set[str], blocks: Sequence[int] = ()
    ) -> ReplicaClient | None:
        """The replica for the next attempt of a request, or None when none can take it;
        `blocks` are the request's `prompt_blocks`."""
        stats = self.strategy.choose(self.candidates, key, exclude, blocks)
        if stats is None:
            return None
        rid = stats.replica_id
        counter = self._decisions.get(rid)
        if counter is None:
            counter = self._decisions[rid] = metrics.ROUTING.labels(
                self.name, rid, self.strategy_name
            )
        counter.inc()
        return self.clients[rid]

    def ready(self) -> bool:
        return any(s.healthy and not s.removed for s in self.candidates)

    def max_model_len(self) -> int | None:
        """The context length the replicas' Health reported (None before any said)."""
        lengths = [c.max_model_len for c in self.clients.values() if c.max_model_len]
        return min(lengths) if lengths else None

    def ready_client(self) -> ReplicaClient | None:
        """A replica in rotation, for unary calls (Tokenize...): the least busy one."""
        ready = [c for c in self.clients.values() if c.stats.healthy and not c.stats.removed]
        return min(ready, key=lambda c: c.stats.in_flight) if ready else None

    def forget_decision_counters(self) -> None:
        """Strategy changed: count decisions under the new strategy label."""
        self._decisions.clear()


class RoutingTable:
    """Models by name, rebuilt from each newer snapshot."""

    def __init__(
        self,
        *,
        workers: int = 1,
        replica_streams: int = 1,
        failure_threshold: int = 3,
        client_factory: Callable[..., ReplicaClient] = ReplicaClient,
        prefix_routing: PrefixRouting | None = None,
    ) -> None:
        self.version = 0
        self.models: dict[str, ModelRouter] = {}
        self.workers = max(1, workers)
        self.replica_streams = replica_streams
        self.failure_threshold = failure_threshold
        self._client_factory = client_factory
        self.prefix_routing = prefix_routing or PrefixRouting()
        """The gateway's `prefix_aware` settings, for every model that routes so."""
        self._closing: set[asyncio.Task[None]] = set()

    def ready(self) -> bool:
        """True once some model has a replica in rotation or can start one on demand."""
        return any(m.ready() or m.autoscaled for m in self.models.values())

    def get(self, model: str) -> ModelRouter | None:
        return self.models.get(model)

    def apply(self, table: controller_pb2.RoutingTable) -> None:
        """Replace the table with a newer snapshot; older or equal versions are ignored."""
        if table.version <= self.version:
            log.debug("ignoring routing table v%d (have v%d)", table.version, self.version)
            return
        seen: set[str] = set()
        for routes in table.models:
            seen.add(routes.model)
            self._apply_model(routes)
        for name in list(self.models):
            if name not in seen:
                router = self.models.pop(name)
                for client in router.clients.values():
                    self._retire(client)
        self.version = table.version
        metrics.TABLE_VERSION.set(table.version)
        log.info(
            "routing table v%d: %s",
            table.version,
            ", ".join(f"{m.model}={len(m.routes)}" for m in table.models) or "no models",
        )

    def _apply_model(self, routes: controller_pb2.ModelRoutes) -> None:
        defaults = Limits()
        router = self.models.get(routes.model)
        strategy = routes.strategy or DEFAULT_STRATEGY
        if strategy not in STRATEGIES:
            log.error(
                "model %s: unknown strategy %r; using %s", routes.model, strategy, DEFAULT_STRATEGY
            )
            strategy = DEFAULT_STRATEGY
        if router is None:
            router = ModelRouter(routes.model, strategy, self.prefix_routing)
            self.models[routes.model] = router
        elif router.strategy_name != strategy:
            router.use_strategy(strategy)
        # Bounds are per gateway; several worker processes share them.
        max_in_flight = math.ceil((routes.max_in_flight or defaults.max_in_flight) / self.workers)
        max_queue = math.ceil((routes.max_queue or defaults.max_queue) / self.workers)
        router.admission.resize(max_in_flight, max_queue)
        router.max_tokens = routes.max_tokens or defaults.max_tokens
        router.autoscaled = routes.autoscaled
        router.cold_start_timeout_s = routes.cold_start_timeout_s
        router.unavailable = routes.unavailable
        router.cache_ttl_s = routes.response_cache_ttl_s
        router.coalesce = routes.coalesce

        old = router.clients
        new: dict[str, ReplicaClient] = {}
        for route in routes.routes:
            rid = route.replica_id or route.address
            client = old.get(rid)
            if client is not None and client.address == route.address:
                new[rid] = client
                continue
            if client is not None:
                self._retire(client)
            client = self._client_factory(
                routes.model,
                rid,
                route.address,
                streams=self.replica_streams,
                failure_threshold=self.failure_threshold,
            )
            client.start()
            new[rid] = client
        for rid, client in old.items():
            if rid not in new:
                self._retire(client)
        router.set_clients(new)

    def _retire(self, client: ReplicaClient) -> None:
        client.stats.removed = True
        task = asyncio.create_task(
            client.close_when_idle(REMOVED_REPLICA_GRACE_S), name=f"retire-{client.replica_id}"
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def refresh_gauges(self) -> None:
        """Copy counters into the gauges and flush batched metrics (about once a second)."""
        metrics.flush()
        for name, router in self.models.items():
            metrics.IN_FLIGHT.labels(name).set(router.admission.in_flight)
            metrics.QUEUED.labels(name).set(router.admission.queued)
            for rid, client in router.clients.items():
                stats = client.stats
                metrics.REPLICA_RUNNING.labels(name, rid).set(stats.running)
                metrics.REPLICA_WAITING.labels(name, rid).set(stats.waiting)
                metrics.REPLICA_KV.labels(name, rid).set(stats.kv_cache_usage)
                metrics.REPLICA_PREFIX_HIT.labels(name, rid).set(stats.prefix_cache_hit_rate)

    async def close(self) -> None:
        clients = [c for m in self.models.values() for c in m.clients.values()]
        self.models.clear()
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def static_table(
    replicas: list[tuple[str, str]], config: ClusterConfig, strategy: str | None = None
) -> controller_pb2.RoutingTable:
    """Version 1 of a table from `--replica MODEL=HOST:PORT` flags.

    Each model takes its deployment's routing and limits from the config, or
    the defaults when the config has no deployment of that name. Deployments
    in the config with no replica given are listed with no routes (known
    models, not ready).
    """
    deployments = {d.name: d for d in config.deployments}
    by_model: dict[str, list[str]] = {}
    for model, address in replicas:
        by_model.setdefault(model, []).append(address)
    if not replicas:
        for name in deployments:
            by_model.setdefault(name, [])
    table = controller_pb2.RoutingTable(version=1)
    for model, addresses in by_model.items():
        dep = deployments.get(model) or Deployment(name=model, model="fake")
        routes = table.models.add(
            model=model,
            strategy=strategy or dep.routing,
            max_in_flight=dep.limits.max_in_flight,
            max_queue=dep.limits.max_queue,
            max_tokens=dep.limits.max_tokens,
            response_cache_ttl_s=dep.response_cache.ttl_s if dep.response_cache.enabled else 0,
            coalesce=dep.response_cache.coalesce,
        )
        for i, address in enumerate(addresses):
            routes.routes.add(replica_id=f"{model}-{i}", address=address)
    return table
