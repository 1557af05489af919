"""The scheduler's Prometheus metrics (names per the project's `mss_` scheme)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

REPLICAS = Gauge("mss_scheduler_replicas", "Replicas on this node, by state.", ["state"])
REPLICA_RESTARTS = Counter(
    "mss_scheduler_replica_restarts_total", "Replica restarts after a crash.", ["deployment"]
)
HEARTBEAT_FAILURES = Counter(
    "mss_scheduler_heartbeat_failures_total", "Register or heartbeat calls that failed."
)
