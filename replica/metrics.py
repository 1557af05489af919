"""Prometheus metrics of one replica, served on its own metrics port.

Engine load gauges read the latest numbers when scraped, and token counters
move once per finished request, so nothing here runs per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from mss.rpc import status_name

if TYPE_CHECKING:
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


class ReplicaMetrics:
    """The gauges of one replica (read from the service and engine when scraped) and its
    per-request counters."""

    def __init__(self, model: str, service: ReplicaService) -> None:
        engine = service.engine
        RUNNING.labels(model).set_function(lambda: engine.load.running)
        WAITING.labels(model).set_function(lambda: engine.load.waiting)
        KV_CACHE.labels(model).set_function(lambda: engine.load.kv_cache_usage)
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
