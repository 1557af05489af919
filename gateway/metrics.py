"""Gateway Prometheus metrics, right with one worker process or many.

With `--workers N` the parent sets PROMETHEUS_MULTIPROC_DIR before the workers
start; prometheus_client then keeps every value in per-process files and
`render()` merges them, so any worker's /metrics shows the whole gateway.
Gauges sum over live workers, except the table version and the replica load
(the most recent report wins).

Hot-path cost: the per-request and per-token counters and histograms of a
model (and its prefix-routing decisions) are children bound once, updated in
local batches (`BatchedHistogram`, `BatchedCounter`: no lock, no label
lookup) that `flush` adds to the exported values every second and at each
scrape.
Gauges are refreshed from the gateway's counters once a second, not per request.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from gateway.rate_limits import LIMIT_KINDS
from gateway.routing.prefix_aware import REASONS as PREFIX_REASONS
from gateway.routing.prefix_aware import DecisionHook

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS = Counter(
    "mss_gateway_requests_total",
    "Requests answered, by route and HTTP status.",
    ["model", "route", "code"],
)
TTFT = Histogram(
    "mss_gateway_ttft_seconds",
    "Time from arrival to the first token sent.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
ITL = Histogram(
    "mss_gateway_itl_seconds",
    "Gap between successive token deliveries to a client.",
    ["model"],
    buckets=ITL_BUCKETS,
)
E2E = Histogram(
    "mss_gateway_e2e_seconds",
    "Time from arrival to the end of the response.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
QUEUE = Histogram(
    "mss_gateway_queue_seconds",
    "Time waiting for an admission slot.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "mss_gateway_in_flight",
    "Requests holding an admission slot.",
    ["model"],
    multiprocess_mode="livesum",
)
QUEUED = Gauge(
    "mss_gateway_queued",
    "Requests waiting for an admission slot.",
    ["model"],
    multiprocess_mode="livesum",
)
HELD = Gauge(
    "mss_gateway_held",
    "Requests held while their autoscaled model has no ready replica.",
    ["model"],
    multiprocess_mode="livesum",
)
HOLD_SECONDS = Histogram(
    "mss_gateway_hold_seconds",
    "Time a request was held for a replica to start (until let go, refused or abandoned).",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter(
    "mss_gateway_prompt_tokens", "Prompt tokens of finished requests.", ["model"]
)
OUTPUT_TOKENS = Counter("mss_gateway_output_tokens", "Tokens streamed to clients.", ["model"])
RETRIES = Counter("mss_gateway_retries", "Requests retried on another replica.", ["model"])
MIGRATIONS = Counter(
    "mss_gateway_migrations",
    "Started requests whose replica failed, by the failure (a gRPC status name) and outcome "
    "(moved: continued on another replica; gave_up: ended with an error event).",
    ["model", "reason", "outcome"],
)
REJECTIONS = Counter(
    "mss_gateway_rejections",
    "Requests refused, by reason (capacity|rate|invalid|auth).",
    ["model", "reason"],
)
DISCONNECTS = Counter(
    "mss_gateway_client_disconnects", "Clients gone before their response ended.", ["model"]
)
CONNECTIONS_CLOSED = Counter(
    "mss_gateway_connections_closed",
    "Client connections the gateway closed before a request was in, by reason "
    "(header_timeout|body_timeout|head_too_large|over_limit).",
    ["reason"],
)
ABORTS = Counter("mss_gateway_aborts", "Engine requests cancelled by the gateway.", ["model"])
KEY_REQUESTS = Counter(
    "mss_gateway_key_requests",
    "Generation requests admitted under each API key (by id, never the key).",
    ["key"],
)
KEY_OUTPUT_TOKENS = Counter(
    "mss_gateway_key_output_tokens",
    "Output tokens charged to each API key when its requests ended.",
    ["key"],
)
KEY_REJECTIONS = Counter(
    "mss_gateway_key_rejections",
    "Requests refused (429) by an API key's limit (requests|tokens|streams).",
    ["key", "limit"],
)
ROUTING = Counter(
    "mss_gateway_routing_decisions",
    "Replica choices, by strategy.",
    ["model", "replica", "strategy"],
)
PREFIX_ROUTING = Counter(
    "mss_gateway_prefix_routing",
    "prefix_aware choices, by reason (match|imbalanced|no_match).",
    ["model", "reason"],
)
PREFIX_MATCH = Histogram(
    "mss_gateway_prefix_match_ratio",
    "Fraction of a request's prompt blocks the best-matching replica was sent before "
    "(prefix_aware choices not decided by load alone).",
    ["model"],
    buckets=RATIO_BUCKETS,
)
REPLICA_RUNNING = Gauge(
    "mss_gateway_replica_running",
    "Running requests a replica last reported.",
    ["model", "replica"],
    multiprocess_mode="mostrecent",
)
REPLICA_WAITING = Gauge(
    "mss_gateway_replica_waiting",
    "Waiting requests a replica last reported.",
    ["model", "replica"],
    multiprocess_mode="mostrecent",
)
REPLICA_KV = Gauge(
    "mss_gateway_replica_kv_cache_usage",
    "KV-cache use (0-1) a replica last reported.",
    ["model", "replica"],
    multiprocess_mode="mostrecent",
)
REPLICA_PREFIX_HIT = Gauge(
    "mss_gateway_replica_prefix_cache_hit_rate",
    "Prefix-cache hit rate (0-1, prompt tokens, recent requests) a replica last reported.",
    ["model", "replica"],
    multiprocess_mode="mostrecent",
)
TABLE_VERSION = Gauge(
    "mss_gateway_routing_table_version",
    "Version of the routing table in use.",
    multiprocess_mode="max",
)

CACHE_HITS = Counter(
    "mss_gateway_response_cache_hits",
    "Response cache lookups answered, by the tier that held the entry (memory|sqlite|redis).",
    ["model", "tier"],
)
CACHE_MISSES = Counter(
    "mss_gateway_response_cache_misses", "Response cache lookups no tier answered.", ["model"]
)
CACHE_EVICTIONS = Counter(
    "mss_gateway_response_cache_evictions",
    "Response cache entries dropped to stay within a tier's byte bound (memory|sqlite).",
    ["tier"],
)
CACHE_BYTES = Gauge(
    "mss_gateway_response_cache_bytes",
    "Key and value bytes held by a response cache tier (memory: summed over workers).",
    ["tier"],
    multiprocess_mode="livesum",
)
CACHE_ERRORS = Counter(
    "mss_gateway_response_cache_errors",
    "Response cache operations that failed in a tier (sqlite|redis), each taken as a miss.",
    ["tier"],
)
COALESCED = Counter(
    "mss_gateway_coalesced_requests",
    "Requests that waited for an identical request in progress and shared its response.",
    ["model"],
)


_batches: list[BatchedHistogram | BatchedCounter] = []
"""Every batch made, for `flush`: a few per model (bound once, in `for_model` and
`prefix_routing_hook`), so the list stays short."""


class BatchedHistogram:
    """Observations counted locally, added to a Histogram child in bulk by `flush`.

    For latencies observed per request or per token: an observation is one bisect and two additions
    instead of a locked update of the shared (or, with several workers,
    memory-mapped) values. Relies on prometheus_client keeping one
    non-cumulative value per bucket in `_buckets` and the sum in `_sum`, as it
    has since 0.4; a unit test checks the exposition matches `observe`.
    """

    __slots__ = ("_bounds", "_counts", "_sum", "child")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        _batches.append(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def flush(self) -> None:
        counts, self._counts = self._counts, [0] * len(self._bounds)
        total, self._sum = self._sum, 0.0
        if not any(counts):
            return
        buckets = self.child._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
        self.child._sum.inc(total)


class BatchedCounter:
    """Increments added up locally, added to a Counter child in bulk by `flush`."""

    __slots__ = ("_total", "child")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self._total = 0.0
        _batches.append(self)

    def inc(self, amount: float = 1.0) -> None:
        self._total += amount

    def flush(self) -> None:
        total, self._total = self._total, 0.0
        if total:
            self.child.inc(total)


@dataclass(slots=True)
class ModelMetrics:
    """Children bound once per model, so the hot path does no label lookups."""

    ttft: BatchedHistogram
    itl: BatchedHistogram
    e2e: BatchedHistogram
    queue: BatchedHistogram
    prompt_tokens: BatchedCounter
    output_tokens: BatchedCounter
    retries: Counter
    disconnects: Counter
    aborts: Counter


_models: dict[str, ModelMetrics] = {}


def for_model(model: str) -> ModelMetrics:
    found = _models.get(model)
    if found is None:
        found = ModelMetrics(
            ttft=BatchedHistogram(TTFT.labels(model)),
            itl=BatchedHistogram(ITL.labels(model)),
            e2e=BatchedHistogram(E2E.labels(model)),
            queue=BatchedHistogram(QUEUE.labels(model)),
            prompt_tokens=BatchedCounter(PROMPT_TOKENS.labels(model)),
            output_tokens=BatchedCounter(OUTPUT_TOKENS.labels(model)),
            retries=RETRIES.labels(model),
            disconnects=DISCONNECTS.labels(model),
            aborts=ABORTS.labels(model),
        )
        _models[model] = found
    return found


@dataclass(slots=True)
class KeyMetrics:
    """Children bound once per API key id; only ids of configured keys become labels."""

    requests: Counter
    output_tokens: Counter
    rejections: dict[str, Counter]
    """By limit kind (`LIMIT_KINDS`)."""


_keys: dict[str, KeyMetrics] = {}


def for_key(key_id: str) -> KeyMetrics:
    found = _keys.get(key_id)
    if found is None:
        found = KeyMetrics(
            requests=KEY_REQUESTS.labels(key_id),
            output_tokens=KEY_OUTPUT_TOKENS.labels(key_id),
            rejections={kind: KEY_REJECTIONS.labels(key_id, kind) for kind in LIMIT_KINDS},
        )
        _keys[key_id] = found
    return found


_prefix_hooks: dict[str, DecisionHook] = {}


def prefix_routing_hook(model: str) -> DecisionHook:
    """What `PrefixAware.on_decision` calls for `model`: children bound once per model, no
    label lookups."""
    hook = _prefix_hooks.get(model)
    if hook is None:
        hook = _prefix_hooks[model] = _prefix_hook(model)
    return hook


def _prefix_hook(model: str) -> DecisionHook:
    counters = {
        reason: BatchedCounter(PREFIX_ROUTING.labels(model, reason)) for reason in PREFIX_REASONS
    }
    ratio = BatchedHistogram(PREFIX_MATCH.labels(model))

    def hook(reason: str, fraction: float | None) -> None:
        counters[reason].inc()
        if fraction is not None:
            ratio.observe(fraction)

    return hook


_request_counters: dict[tuple[str, str, int], Counter] = {}


def count_request(model: str, route: str, status: int) -> None:
    """mss_gateway_requests_total, with its children cached (one dict lookup per request)."""
    key = (model, route, status)
    child = _request_counters.get(key)
    if child is None:
        child = _request_counters[key] = REQUESTS.labels(model, route, str(status))
    child.inc()


def flush() -> None:
    """Move locally batched observations into the exported metrics."""
    for batch in _batches:
        batch.flush()


def render() -> tuple[bytes, str]:
    """The exposition text of the whole gateway (all workers in multiprocess mode)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        from prometheus_client import multiprocess

        reap_dead_workers(directory)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def reap_dead_workers(directory: str) -> None:
    """Drop the live gauges (in-flight, queued) of workers that have died.

    A worker killed and replaced by uvicorn leaves its gauge files behind, and
    its last values would stay in the sums for good. Counters and histograms
    of dead workers are kept: what they counted did happen.
    """
    from prometheus_client import multiprocess

    for name in os.listdir(directory):
        if not name.startswith("gauge_live"):
            continue
        try:
            pid = int(name.rsplit("_", 1)[1].split(".", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:
            pass  # alive, another user's
