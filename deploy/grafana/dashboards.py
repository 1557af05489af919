"""Writes the Grafana dashboards in deploy/grafana/dashboards/ from one description.

Run `python deploy/grafana/dashboards.py` after changing a panel; the JSON files
are committed, and a unit test checks they match this file. Every panel query
uses only metrics documented in docs/metrics.md, the `$model` variable and
`$__rate_interval`; an integration test runs each of them against a real
Prometheus scraping a running system and fails on any that returns nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASOURCE_UID = "mss-prometheus"
"""Must match deploy/grafana/provisioning/datasources/prometheus.yml."""
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
OUT_DIR = Path(__file__).resolve().parent / "dashboards"
SCHEMA_VERSION = 39
M = 'model=~"$model"'
RI = "$__rate_interval"


@dataclass
class Panel:
    """One time series or stat panel: a title, its queries as (legend, PromQL) and a unit."""

    title: str
    queries: list[tuple[str, str]]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    description: str = ""
    stack: bool = False
    limits: tuple[float, float] | None = None
    """Fixed y-axis range (min, max), e.g. (0, 1) for a fraction."""


def quantiles(metric: str, labels: str = M, by: str = "") -> list[tuple[str, str]]:
    """p50/p95/p99 of a histogram over the rate interval."""
    group = f"{by}, le" if by else "le"
    selector = f"{metric}_bucket{{{labels}}}" if labels else f"{metric}_bucket"
    prefix = "{{" + by + "}} " if by else ""
    return [
        (
            f"{prefix}p{q}",
            f"histogram_quantile(0.{q}, sum by ({group}) (rate({selector}[{RI}])))",
        )
        for q in ("50", "95", "99")
    ]


def model_variable(metric: str) -> dict[str, Any]:
    return {
        "name": "model",
        "label": "Model",
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": f"label_values({metric}, model)", "refId": "model"},
        "definition": f"label_values({metric}, model)",
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def render_panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {
            "datasource": DATASOURCE,
            "refId": chr(ord("A") + i),
            "expr": expr,
            "legendFormat": legend,
            "range": True,
        }
        for i, (legend, expr) in enumerate(panel.queries)
    ]
    custom: dict[str, Any] = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
    if panel.stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    out: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "unit": panel.unit,
                **({"custom": custom} if panel.kind == "timeseries" else {}),
            },
            "overrides": [],
        },
        "options": (
            {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
            if panel.kind == "timeseries"
            else {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value",
                "graphMode": "area",
                "textMode": "auto",
            }
        ),
    }
    if panel.limits is not None:
        defaults = out["fieldConfig"]["defaults"]
        defaults["min"], defaults["max"] = panel.limits
    return out


def dashboard(
    uid: str, title: str, description: str, panels: list[Panel], variable_metric: str | None
) -> dict[str, Any]:
    rendered = []
    x = y = 0
    row_height = 0
    for pid, panel in enumerate(panels, start=1):
        if x + panel.width > 24:
            x, y = 0, y + row_height
            row_height = 0
        rendered.append(render_panel(panel, pid, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    variables = [model_variable(variable_metric)] if variable_metric else []
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["mss"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["mss"], "asDropdown": True, "title": "MSS dashboards"}
        ],
        "panels": rendered,
    }


def overview() -> dict[str, Any]:
    errors_5xx = f'sum(rate(mss_gateway_requests_total{{{M},code=~"5.."}}[{RI}]))'
    all_requests = f"sum(rate(mss_gateway_requests_total{{{M}}}[{RI}]))"
    panels = [
        Panel(
            "Requests/s by status",
            [("{{code}}", f"sum by (code) (rate(mss_gateway_requests_total{{{M}}}[{RI}]))")],
            unit="reqps",
            stack=True,
            description="Answers of the gateway, by HTTP status (499: the client left).",
        ),
        Panel(
            "Error ratio (5xx)",
            [("5xx / all", f"({errors_5xx} or vector(0)) / {all_requests}")],
            unit="percentunit",
            description="Share of answers that are 5xx; the MssErrorRatioHigh alert fires over 5%.",
        ),
        Panel(
            "Time to first token",
            quantiles("mss_gateway_ttft_seconds"),
            unit="s",
            description="From arrival at the gateway to the first token sent to the client.",
        ),
        Panel(
            "Inter-token latency",
            quantiles("mss_gateway_itl_seconds"),
            unit="s",
            description="Gap between successive token deliveries to a client.",
        ),
        Panel(
            "Output tokens/s",
            [("{{model}}", f"sum by (model) (rate(mss_gateway_output_tokens_total{{{M}}}[{RI}]))")],
            unit="short",
            stack=True,
        ),
        Panel(
            "Prompt tokens/s",
            [("{{model}}", f"sum by (model) (rate(mss_gateway_prompt_tokens_total{{{M}}}[{RI}]))")],
            unit="short",
            stack=True,
        ),
        Panel(
            "In flight and queued",
            [
                ("in flight {{model}}", f"sum by (model) (mss_gateway_in_flight{{{M}}})"),
                ("queued {{model}}", f"sum by (model) (mss_gateway_queued{{{M}}})"),
            ],
            description="Requests holding an admission slot, and waiting for one (all workers).",
        ),
        Panel(
            "End-to-end latency",
            quantiles("mss_gateway_e2e_seconds"),
            unit="s",
        ),
        Panel(
            "Queue time",
            quantiles("mss_gateway_queue_seconds"),
            unit="s",
            description="Time waiting for an admission slot at the gateway.",
        ),
        Panel(
            "Rejections/s by reason",
            [("{{reason}}", f"sum by (reason) (rate(mss_gateway_rejections_total{{{M}}}[{RI}]))")],
            unit="reqps",
            stack=True,
            description="capacity (503), rate (429, per-client limit), invalid (4xx), auth (401).",
        ),
        Panel(
            "Retries, disconnects, aborts /s",
            [
                ("retries", f"sum(rate(mss_gateway_retries_total{{{M}}}[{RI}]))"),
                (
                    "client disconnects",
                    f"sum(rate(mss_gateway_client_disconnects_total{{{M}}}[{RI}]))",
                ),
                ("aborts", f"sum(rate(mss_gateway_aborts_total{{{M}}}[{RI}]))"),
            ],
            unit="reqps",
        ),
        Panel(
            "Routing decisions/s by replica",
            [
                (
                    "{{replica}} ({{strategy}})",
                    "sum by (replica, strategy) "
                    f"(rate(mss_gateway_routing_decisions_total{{{M}}}[{RI}]))",
                )
            ],
            unit="reqps",
            stack=True,
        ),
    ]
    return dashboard(
        "mss-overview",
        "MSS / Overview",
        "What users see: request rate, errors, time to first token, inter-token latency, tokens/s.",
        panels,
        "mss_gateway_requests_total",
    )


def replicas() -> dict[str, Any]:
    panels = [
        Panel(
            "Engine running requests",
            [("{{replica}}", f"sum by (replica) (mss_replica_running{{{M}}})")],
            stack=True,
        ),
        Panel(
            "Engine waiting requests",
            [("{{replica}}", f"sum by (replica) (mss_replica_waiting{{{M}}})")],
            stack=True,
        ),
        Panel(
            "KV-cache use",
            [("{{replica}}", f"max by (replica) (mss_replica_kv_cache_usage{{{M}}})")],
            unit="percentunit",
            limits=(0, 1),
        ),
        Panel(
            "Generated tokens/s",
            [
                (
                    "{{replica}}",
                    f"sum by (replica) (rate(mss_replica_generated_tokens_total{{{M}}}[{RI}]))",
                )
            ],
            stack=True,
        ),
        Panel(
            "Requests/s by outcome",
            [("{{outcome}}", f"sum by (outcome) (rate(mss_replica_requests_total{{{M}}}[{RI}]))")],
            unit="reqps",
            stack=True,
        ),
        Panel(
            "In flight per replica",
            [("{{replica}}", f"sum by (replica) (mss_replica_in_flight{{{M}}})")],
        ),
        Panel(
            "Prompt tokens/s",
            [
                (
                    "{{replica}}",
                    f"sum by (replica) (rate(mss_replica_prompt_tokens_total{{{M}}}[{RI}]))",
                )
            ],
            stack=True,
        ),
        Panel(
            "Ready and scraped",
            [
                ("ready {{replica}}", f"max by (replica) (mss_replica_ready{{{M}}})"),
                ("up {{replica}}", 'max by (replica) (up{job="mss-replica"})'),
            ],
            description="1 when the engine is loaded and not draining; up is 0 when scrapes fail.",
        ),
        Panel(
            "Load as the gateway sees it (running)",
            [("{{replica}}", f"max by (replica) (mss_gateway_replica_running{{{M}}})")],
            description="The load each replica last reported in its replies, used for routing.",
        ),
        Panel(
            "KV-cache use as the gateway sees it",
            [("{{replica}}", f"max by (replica) (mss_gateway_replica_kv_cache_usage{{{M}}})")],
            unit="percentunit",
        ),
        Panel(
            "Prefix-cache hit rate",
            [("{{replica}}", f"max by (replica) (mss_replica_prefix_cache_hit_rate{{{M}}})")],
            unit="percentunit",
            limits=(0, 1),
            description="Share of prompt tokens whose KV blocks the engine already held, over "
            "its last ~1,000 requests (0 with the fake engine).",
        ),
        Panel(
            "Prompt tokens/s from the prefix cache",
            [
                (
                    "{{replica}}",
                    f"sum by (replica) (rate(mss_replica_prefix_cache_hits_total{{{M}}}[{RI}]))",
                )
            ],
            stack=True,
            description="Prompt tokens not computed again because the prefix cache held them.",
        ),
    ]
    return dashboard(
        "mss-replicas",
        "MSS / Replicas",
        "Per replica: engine batch (running, waiting), KV-cache use, prefix-cache hits, tokens/s "
        "and outcomes.",
        panels,
        "mss_replica_ready",
    )


TARGET_BY_DEPLOYMENT = "sum by (deployment) (mss_controller_deployment_target_replicas)"
RUNNING_BY_DEPLOYMENT = "sum by (deployment) (mss_controller_deployment_running_replicas)"


def control_plane() -> dict[str, Any]:
    panels = [
        Panel(
            "Replicas by state",
            [("{{deployment}} {{state}}", "sum by (deployment, state) (mss_controller_replicas)")],
            stack=True,
        ),
        Panel(
            "Target and running replicas",
            [
                ("{{deployment}} target", TARGET_BY_DEPLOYMENT),
                ("{{deployment}} running", RUNNING_BY_DEPLOYMENT),
            ],
        ),
        Panel(
            "Live nodes", [("nodes", "mss_controller_nodes_alive")], kind="stat", width=6, height=6
        ),
        Panel(
            "Routing table version",
            [
                ("controller", "max(mss_controller_routing_table_version)"),
                ("gateways (oldest)", "min(mss_gateway_routing_table_version)"),
            ],
            kind="stat",
            width=6,
            height=6,
            description="A gateway behind the controller for long has lost its route watch.",
        ),
        Panel(
            "Scrape targets up",
            [("{{job}}", "sum by (job) (up)")],
            kind="stat",
            width=12,
            height=6,
        ),
        Panel(
            "Reconcile duration",
            quantiles("mss_controller_reconcile_seconds", labels=""),
            unit="s",
        ),
        Panel(
            "Replica restarts (1h)",
            [
                (
                    "controller {{deployment}}",
                    "sum by (deployment) (increase(mss_controller_replica_restarts_total[1h]))",
                ),
            ],
        ),
        Panel(
            "Replicas against load",
            [
                ("{{deployment}} running", RUNNING_BY_DEPLOYMENT),
                ("{{deployment}} target", TARGET_BY_DEPLOYMENT),
                (
                    "{{deployment}} ongoing requests",
                    "sum by (deployment) (mss_controller_autoscaler_ongoing_requests)",
                ),
                (
                    "{{deployment}} held requests",
                    "sum by (deployment) (mss_controller_autoscaler_held_requests)",
                ),
            ],
            width=24,
            description="Replicas the autoscaler wants (target) and has running, against the "
            "requests in flight, queued or held for the deployment (held: no replica ready).",
        ),
        Panel(
            "Autoscaler decisions (1h)",
            [
                (
                    "{{deployment}} {{direction}} {{reason}}",
                    "sum by (deployment, direction, reason) "
                    "(increase(mss_controller_autoscaler_decisions_total[1h]))",
                ),
            ],
            description="Target changes by direction and reason; hold/pending: a wanted "
            "replica had no node with room.",
        ),
        Panel(
            "Cold start (from zero to a running replica, 1h)",
            [
                (
                    f"p{q}",
                    f"histogram_quantile(0.{q}, sum by (le) "
                    "(increase(mss_controller_cold_start_seconds_bucket[1h])))",
                )
                for q in ("50", "95")
            ],
            unit="s",
        ),
        Panel(
            "Replicas per node by state",
            [("{{node}} {{state}}", "sum by (node, state) (mss_scheduler_replicas)")],
            stack=True,
        ),
        Panel(
            "Scheduler heartbeat failures/s",
            [("{{node}}", f"sum by (node) (rate(mss_scheduler_heartbeat_failures_total[{RI}]))")],
            unit="reqps",
        ),
    ]
    return dashboard(
        "mss-control-plane",
        "MSS / Control plane",
        "Controller and schedulers: replicas by state, autoscaling, nodes, table versions, "
        "reconcile time.",
        panels,
        None,
    )


DASHBOARDS = {
    "overview.json": overview,
    "replicas.json": replicas,
    "control-plane.json": control_plane,
}


def render_all() -> dict[str, str]:
    """File name -> JSON text, exactly as committed."""
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (OUT_DIR / name).write_text(text)


if __name__ == "__main__":
    main()
