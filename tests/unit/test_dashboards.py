"""Grafana dashboards, provisioning, alert rules and docs/metrics.md agree with the code.

The committed dashboard JSON is what deploy/grafana/dashboards.py renders; each
dashboard is well formed (unique ids, panels inside the 24-column grid without
overlaps, the provisioned datasource, only the `$model` and `$__rate_interval`
variables); every metric a panel or an alert queries is one the code exports,
and docs/metrics.md documents exactly the metrics the code exports. Whether
each query returns data is proven against a real Prometheus in
tests/integration/test_observability_prometheus.py.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import controller.metrics
import gateway.metrics
import replica.metrics
import scheduler.metrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
METRIC_RE = re.compile(r"\bmss_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count")
MODULES = (gateway.metrics, replica.metrics, controller.metrics, scheduler.metrics)


@functools.cache
def load_generator() -> ModuleType:
    """deploy/grafana/dashboards.py (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("grafana_dashboards", GRAFANA / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def exported_metrics() -> set[str]:
    """Names as Prometheus stores them: counters with `_total`, histograms by base name."""
    assert all(MODULES)
    names = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("mss_"):
            continue
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_committed_json_is_what_the_generator_renders() -> None:
    rendered = load_generator().render_all()
    committed = {name: (GRAFANA / "dashboards" / name).read_text() for name in rendered}
    assert set(rendered) == {p.name for p in (GRAFANA / "dashboards").glob("*.json")}
    for name, text in rendered.items():
        assert committed[name] == text, f"{name} is stale: run python deploy/grafana/dashboards.py"


def test_provisioning_files_point_at_the_dashboards_datasource() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"].startswith("http://")
    assert source["uid"] == load_generator().DATASOURCE_UID
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "mss.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


@pytest.mark.parametrize("name", ["overview.json", "replicas.json", "control-plane.json"])
def test_dashboard_is_well_formed(name: str) -> None:
    board = dashboards()[name]
    uid = load_generator().DATASOURCE_UID
    assert board["uid"].startswith("mss-") and board["title"].startswith("MSS / ")
    assert board["schemaVersion"] >= 36
    variables = {v["name"] for v in board["templating"]["list"]}
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 8
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}
        assert panel["type"] in ("timeseries", "stat")
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
            expr = target["expr"]
            used = set(re.findall(r"\$(\w+)", expr))
            assert used <= {"model", "__rate_interval"}, (panel["title"], used)
            if "model" in used:
                assert "model" in variables
            assert METRIC_RE.search(expr) or "up" in expr, expr


def test_overview_has_the_panels_operators_need() -> None:
    titles = {p["title"] for p in dashboards()["overview.json"]["panels"]}
    for wanted in (
        "Requests/s by status",
        "Error ratio (5xx)",
        "Time to first token",
        "Inter-token latency",
        "Output tokens/s",
        "In flight and queued",
    ):
        assert wanted in titles
    exprs = [t["expr"] for p in dashboards()["overview.json"]["panels"] for t in p["targets"]]
    for q in ("0.50", "0.95", "0.99"):
        assert any(
            f"histogram_quantile({q}" in e and "mss_gateway_ttft_seconds" in e for e in exprs
        )
        assert any(f"histogram_quantile({q}" in e and "mss_gateway_itl_seconds" in e for e in exprs)


def test_queries_and_alerts_use_exported_metrics_only() -> None:
    exported = exported_metrics()
    texts = [json.dumps(b) for b in dashboards().values()]
    texts.append((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    used = {base_name(m) for text in texts for m in METRIC_RE.findall(text)}
    assert used, "no metric found in the dashboards"
    assert used <= exported, sorted(used - exported)


def test_docs_list_exactly_the_exported_metrics() -> None:
    documented = set(
        re.findall(r"^\| `(mss_[a-z0-9_]+)`", (ROOT / "docs" / "metrics.md").read_text(), re.M)
    )
    exported = exported_metrics()
    assert documented == exported, {
        "undocumented": sorted(exported - documented),
        "documented but not exported": sorted(documented - exported),
    }
