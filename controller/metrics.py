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
RUNNING_REPLICAS = Gauge(
    "mss_controller_deployment_running_replicas",
    "Replicas per deployment that are wanted and running (routed).",
    ["deployment"],
)
AUTOSCALER_DECISIONS = Counter(
    "mss_controller_autoscaler_decisions",
    "Autoscaler decisions that changed a target (direction up|down), and holds for want of "
    "room (direction hold, reason pending), by reason.",
    ["deployment", "direction", "reason"],
)
AUTOSCALER_ONGOING = Gauge(
    "mss_controller_autoscaler_ongoing_requests",
    "Requests in flight, queued or held for an autoscaled deployment, as the autoscaler saw.",
    ["deployment"],
)
AUTOSCALER_HELD = Gauge(
    "mss_controller_autoscaler_held_requests",
    "Requests gateways hold for an autoscaled deployment with no ready replica.",
    ["deployment"],
)
COLD_START_SECONDS = Histogram(
    "mss_controller_cold_start_seconds",
    "From the decision to leave zero replicas to the first running replica.",
    ["deployment"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)
