"""The controller's Prometheus metrics (names per the project's `mss_` scheme)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REPLICAS = Gauge(
    "mss_controller_replicas", "Replicas the controller knows, by state.", ["deployment", "state"]
)
NODES_ALIVE = Gauge("mss_controller_nodes_alive", "Nodes whose heartbeats are on time.")
ROUTING_TABLE_VERSION = Gauge(
    "mss_controller_routing_table_version", "Version of the routing table last published."
)
RECONCILE_SECONDS = Histogram(
    "mss_controller_reconcile_seconds",
    "Time of one reconcile step.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
REPLICA_RESTARTS = Counter(
    "mss_controller_replica_restarts_total",
    "Replica restarts reported by schedulers.",
    ["deployment"],
)
TARGET_REPLICAS = Gauge(
    "mss_controller_deployment_target_replicas", "Desired replicas per deployment.", ["deployment"]
)
