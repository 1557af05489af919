"""Prometheus metrics of one replica, served on its own metrics port.

Engine load gauges and the prefix-cache counters read the engine's latest
numbers when scraped, and token counters move once per finished request, so
nothing here runs per token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from mss.rpc import status_name

if TYPE_CHECKING:
    from replica.engine import Engine
    from replica.server import ReplicaService

REQUESTS = Counter(
    "mss_replica_requests_total",
    "Requests that ended on this replica, by outcome (stop, length, abort, error, rejected_*).",
    ["model", "outcome"],
)
RUNNING = Gauge("mss_replica_running", "Requests the engine is running.", ["model"])
WAITING = Gauge("mss_replica_waiting", "Requests waiting in the engine's queue.", ["model"])
KV_CACHE = Gauge("mss_replica_kv_cache_usage", "KV-cache use, 0-1.", ["model"])
IN_FLIGHT = Gauge("mss_replica_in_flight", "Requests admitted and not finished.", ["model"])
READY = Gauge(
    "mss_replica_ready", "1 once the engine has loaded, 0 while loading or draining.", ["model"]
)
GENERATED = Counter("mss_replica_generated_tokens_total", "Output tokens generated.", ["model"])
PROMPT = Counter("mss_replica_prompt_tokens_total", "Prompt tokens processed.", ["model"])
PREFIX_HIT_RATE = Gauge(
    "mss_replica_prefix_cache_hit_rate",
    "Prefix-cache hits over lookups (prompt tokens) for the engine's last ~1,000 requests, 0-1.",
    ["model"],
)


class PrefixCacheCounters(Collector):
    """`mss_replica_prefix_cache_{queries,hits}_total`, read from the engine when scraped.

    The engine adds these up itself (`EngineLoad.prefix_cache_queries` and
    `prefix_cache_hits`, in tokens); a prometheus_client Counter cannot read
    a function, so this collector reports the engine's numbers as counters.
    One engine per model label; binding another replaces it, as `set_function`
    does for the gauges.
    """

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}

    def bind(self, model: str, engine: Engine) -> None:
        self._engines[model] = engine

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[CounterMetricFamily]:
        queries, hits = self._families()
        for model, engine in self._engines.items():
            load = engine.load
            queries.add_metric([model], load.prefix_cache_queries)
            hits.add_metric([model], load.prefix_cache_hits)
        yield from (queries, hits)

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(
                "mss_replica_prefix_cache_queries",
                "Prompt tokens looked up in the engine's prefix cache.",
                labels=["model"],
            ),
            CounterMetricFamily(
                "mss_replica_prefix_cache_hits",
                "Prompt tokens found in the prefix cache (their KV blocks reused, not computed).",
                labels=["model"],
            ),
        )


PREFIX_CACHE = PrefixCacheCounters()
REGISTRY.register(PREFIX_CACHE)


class ReplicaMetrics:
    """The gauges of one replica (read from the service and engine when scraped) and its
    per-request counters."""

    def __init__(self, model: str, service: ReplicaService) -> None:
        engine = service.engine
        RUNNING.labels(model).set_function(lambda: engine.load.running)
        WAITING.labels(model).set_function(lambda: engine.load.waiting)
        KV_CACHE.labels(model).set_function(lambda: engine.load.kv_cache_usage)
        PREFIX_HIT_RATE.labels(model).set_function(lambda: engine.load.prefix_cache_hit_rate)
        PREFIX_CACHE.bind(model, engine)
        IN_FLIGHT.labels(model).set_function(lambda: service.in_flight)
        READY.labels(model).set_function(lambda: float(service.ready and not service.draining))
        self._generated = GENERATED.labels(model)
        self._prompt = PROMPT.labels(model)
        self._model = model

    def finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._prompt.inc(prompt_tokens)
        self._generated.inc(completion_tokens)

    def outcome(self, outcome: str) -> None:
        REQUESTS.labels(self._model, outcome).inc()

    def rejected(self, code: int) -> None:
        """A request refused before it ran; `code` is the status number sent to the gateway."""
        REQUESTS.labels(self._model, f"rejected_{status_name(code)}").inc()
