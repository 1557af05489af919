"""The Kubernetes manifests, the image and the code agree, checked offline.

Every overlay renders with `kubectl kustomize`; every built-in object is valid
against the Kubernetes API schemas (kubernetes-validate, strict) and the
Prometheus Operator objects have the fields the operator reads; checkov finds
nothing that deploy/kubernetes/checkov-accepted.yaml does not explain;
hadolint passes the Dockerfile. Against the code: every `mss` command line
parses with the real argument parser, every port a process listens on is a
declared container port that the Services, probes, NetworkPolicies and
monitors name, the ConfigMap validates with mss/config.py and fits the
schedulers' offer, the alert rules are deploy/prometheus/alerts.yml, and the
generated files are fresh. tests/integration/test_kubernetes_wiring.py runs
the rendered pods.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from mss.cli import COMMANDS
from mss.config import parse_config
from tests.kube_render import (
    KUBE_DIR,
    OLDEST_KUBERNETES,
    OVERLAYS,
    ROOT,
    config_text,
    expand,
    objects,
    one,
    pod_labels,
    pod_spec,
    quantity,
    render,
    require_module,
    require_tool,
    resolve_env,
    selects,
    unresolved,
    workloads,
)

MONITORING_GROUP = "monitoring.coreos.com"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
SAMPLE_FIELDS = {"spec.nodeName": "node-a", "status.podIP": "10.1.2.3"}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kube_generate", KUBE_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _containers(overlay: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(w, c) for w in workloads(overlay) for c in pod_spec(w)["containers"]]


def _parse(container: dict[str, Any]) -> tuple[str, argparse.Namespace]:
    """The container's `mss` command line, $(VAR)s filled in, parsed by the role's real parser."""
    assert container.get("command") == ["mss"], f"{container['name']}: command is not ['mss']"
    env = resolve_env(container, SAMPLE_FIELDS)
    argv = [expand(arg, env) for arg in container["args"]]
    role = argv[0]
    assert role in COMMANDS, f"{container['name']}: unknown mss command {role!r}"
    module_name, _, name = COMMANDS[role][0].partition(":")
    module = importlib.import_module(module_name)
    command = getattr(module, name) if name else module
    parser = argparse.ArgumentParser(prog=f"mss {role}", exit_on_error=False)
    command.add_arguments(parser)
    try:
        return role, parser.parse_args(argv[1:])
    except (argparse.ArgumentError, SystemExit) as exc:
        command_line = " ".join(argv)
        raise AssertionError(f"{container['name']}: `mss {command_line}` does not parse") from exc


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        assert port in _ports(container).values(), f"{container['name']}: port {port} undeclared"
        return port
    assert port in _ports(container), f"{container['name']}: no container port named {port!r}"
    return _ports(container)[port]


# --- rendering and schemas -------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_stack_in_one_namespace(overlay: str) -> None:
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in render(overlay)}
    for wanted in [
        ("StatefulSet", "mss-controller"),
        ("Service", "mss-controller"),
        ("DaemonSet", "mss-scheduler"),
        ("Deployment", "mss-gateway"),
        ("Service", "mss-gateway"),
        ("PodDisruptionBudget", "mss-gateway"),
        ("HorizontalPodAutoscaler", "mss-gateway"),
        ("PrometheusRule", "mss-alerts"),
        ("PodMonitor", "mss-scheduler"),
        ("ScrapeConfig", "mss-replicas"),
    ]:
        assert wanted in kinds, f"{overlay}: {wanted} missing"
    for obj in render(overlay):
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "mss", (
                overlay,
                obj["kind"],
                obj["metadata"],
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_are_valid_against_the_api_schemas(overlay: str) -> None:
    kubernetes_validate = require_module("kubernetes_validate")
    versions = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())
    for obj in render(overlay):
        if obj["apiVersion"].startswith(MONITORING_GROUP):
            _check_monitoring_object(obj)
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = f"{overlay}: {obj['kind']} {obj['metadata']['name']} on {version}"
                raise AssertionError(f"{where}: {exc}") from exc


_RELABEL_KEYS = {
    "sourceLabels",
    "separator",
    "targetLabel",
    "regex",
    "modulus",
    "replacement",
    "action",
}
_MONITORING_SPEC_KEYS = {
    "ServiceMonitor": {"selector", "endpoints", "namespaceSelector", "jobLabel"},
    "PodMonitor": {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"},
    "ScrapeConfig": {"httpSDConfigs", "scrapeInterval", "metricsPath", "relabelings"},
    "PrometheusRule": {"groups"},
}
_ENDPOINT_KEYS = {"port", "path", "interval", "relabelings", "scheme"}


def _check_monitoring_object(obj: dict[str, Any]) -> None:
    """The fields of the Prometheus Operator API (v0.65+) these objects use, and only those.

    Its CRD schemas are not shipped offline; this checks names and shapes of what is used.
    """
    kind, spec = obj["kind"], obj["spec"]
    version = "v1alpha1" if kind == "ScrapeConfig" else "v1"
    assert obj["apiVersion"] == f"{MONITORING_GROUP}/{version}", obj["apiVersion"]
    assert set(spec) <= _MONITORING_SPEC_KEYS[kind], (kind, set(spec))
    endpoints = spec.get("endpoints", []) + spec.get("podMetricsEndpoints", [])
    relabelings = list(spec.get("relabelings", []))
    for endpoint in endpoints:
        relabelings += endpoint.get("relabelings", [])
    for endpoint in endpoints:
        assert set(endpoint) <= _ENDPOINT_KEYS and "port" in endpoint, endpoint
    for rule in relabelings:
        assert set(rule) <= _RELABEL_KEYS, rule
        assert rule.get("action", "replace") in {"replace", "keep", "drop", "labelmap"}, rule
    for sd in spec.get("httpSDConfigs", []):
        assert set(sd) <= {"url", "refreshInterval"} and sd["url"].startswith("http"), sd
    if kind in ("ServiceMonitor", "PodMonitor"):
        assert spec["selector"]["matchLabels"], obj
    for group in spec.get("groups", []):
        assert set(group) <= {"name", "rules", "interval"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}, rule


# --- scanners ---------------------------------------------------------------------------


def test_checkov_findings_are_all_explained(tmp_path: Path) -> None:
    checkov = require_tool(
        "checkov",
        ROOT / ".venv-checkov" / "bin" / "checkov",
        Path(sys.executable).parent / "checkov",
    )
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(render(overlay)))
    (tmp_path / "Dockerfile").write_text(DOCKERFILE.read_text())
    out = subprocess.run(
        [checkov, "-d", str(tmp_path), "--framework", "kubernetes", "dockerfile",
         "--skip-download", "--quiet", "--compact", "-o", "json"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert out.stdout.strip(), f"checkov printed nothing:\n{out.stderr[-3000:]}"
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = {
        (check["check_id"], check["resource"])
        for report in reports
        if isinstance(report, dict) and "results" in report
        for check in report["results"]["failed_checks"]
    }
    checked = sum(r["summary"]["passed"] for r in reports if isinstance(r, dict) and "summary" in r)
    assert checked > 100, f"checkov passed only {checked} checks: did it read the files?"
    accepted: dict[str, str] = yaml.safe_load((KUBE_DIR / "checkov-accepted.yaml").read_text())
    unexplained = sorted(f"{cid} on {res}" for cid, res in failed if cid not in accepted)
    assert not unexplained, (
        "checkov findings with no reason in checkov-accepted.yaml:\n" + "\n".join(unexplained)
    )
    stale = set(accepted) - {cid for cid, _ in failed}
    assert not stale, f"checkov-accepted.yaml lists checks that no longer fail: {sorted(stale)}"


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = require_tool("hadolint", Path(sys.executable).parent / "hadolint")
    out = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    allowed = {
        line.lstrip("!").rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied += line.split()[1:-1]
    assert copied, "the Dockerfile copies nothing from the context"
    for source in copied:
        assert source.rstrip("/").removeprefix("./") in allowed, f"{source} is in .dockerignore"
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
    for package in ("mss", "protos", "gateway", "controller", "replica", "scheduler"):
        assert package in allowed, f"the image lacks the {package} package"


# --- the manifests against the code -----------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_mss_command_line_parses(overlay: str) -> None:
    roles = set()
    for _workload, container in _containers(overlay):
        defined = {var["name"] for var in container.get("env", [])}
        for arg in container["args"]:
            missing = set(unresolved(arg)) - defined
            assert not missing, f"{container['name']}: {arg} uses undefined {missing}"
        role, _args = _parse(container)
        roles.add(role)
    assert roles == {"controller", "scheduler", "gateway"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_match_services_probes_and_policies(overlay: str) -> None:
    by_name = {w["metadata"]["name"]: w for w in workloads(overlay)}
    services = {s["metadata"]["name"]: s for s in objects(overlay, "Service")}
    ranges: dict[str, range] = {}
    for _workload, container in _containers(overlay):
        role, args = _parse(container)
        declared = set(_ports(container).values())
        # The gateway serves /metrics on its HTTP port; the others on a port of their own.
        listening = {args.port} if role == "gateway" else {args.metrics_port}
        if role == "controller":
            listening.add(args.port)
        if role == "scheduler":
            ranges = {"grpc": args.replica_ports, "metrics": args.replica_metrics_ports}
            assert _ports(container)["replica-grpc"] == args.replica_ports.start
            assert _ports(container)["replica-metrics"] == args.replica_metrics_ports.start
            declared -= {args.replica_ports.start, args.replica_metrics_ports.start}
        assert listening == declared, (
            f"{container['name']}: listens {listening}, declares {declared}"
        )
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(kind)
            assert probe, f"{container['name']} has no {kind}"
            action = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
            assert action, probe
            _port_number(container, action["port"])
        # Clients of the controller name its Service and gRPC port.
        if getattr(args, "controller", None):
            host, _, port = args.controller.rpartition(":")
            service = services[host]
            target = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}[int(port)]
            controller = pod_spec(by_name["mss-controller"])["containers"][0]
            assert _port_number(controller, target) == 50051 == _parse(controller)[1].port
    assert ranges, "no scheduler found"
    for service in services.values():
        matched = [
            w for w in workloads(overlay) if selects(service["spec"]["selector"], pod_labels(w))
        ]
        assert matched, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            for workload in matched:
                _port_number(pod_spec(workload)["containers"][0], port["targetPort"])
    for policy in objects(overlay, "NetworkPolicy"):
        targets = [
            w for w in workloads(overlay) if selects(policy["spec"]["podSelector"], pod_labels(w))
        ]
        assert targets, f"NetworkPolicy {policy['metadata']['name']} selects no pod"
        for rule in policy["spec"]["ingress"]:
            for peer in rule.get("from", []):
                if "podSelector" in peer:
                    assert any(
                        selects(peer["podSelector"], pod_labels(w)) for w in workloads(overlay)
                    )
            for port in rule["ports"]:
                if "endPort" in port:
                    opened = range(port["port"], port["endPort"] + 1)
                    assert opened in ranges.values(), f"{policy['metadata']['name']}: {opened}"
                else:
                    for workload in targets:
                        _port_number(pod_spec(workload)["containers"][0], port["port"])
    for monitor in objects(overlay, "ServiceMonitor"):
        matched = [
            s
            for s in services.values()
            if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        assert len(matched) == 1, monitor["metadata"]["name"]
        names = {p["name"] for p in matched[0]["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= names
    for monitor in objects(overlay, "PodMonitor"):
        for workload in workloads(overlay):
            if selects(monitor["spec"]["selector"], pod_labels(workload)):
                for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                    _port_number(pod_spec(workload)["containers"][0], endpoint["port"])
    scrape = one(overlay, "ScrapeConfig", "mss-replicas")
    controller = one(overlay, "Service", "mss-controller")
    metrics_port = {p["name"]: p["port"] for p in controller["spec"]["ports"]}["metrics"]
    assert scrape["spec"]["httpSDConfigs"][0]["url"] == (
        f"http://mss-controller.{controller['metadata']['namespace']}.svc:{metrics_port}/targets"
    )


def test_only_gateways_and_schedulers_reach_the_controller_and_only_gateways_replicas() -> None:
    for overlay in OVERLAYS:
        controller = one(overlay, "NetworkPolicy", "mss-controller")["spec"]["ingress"]
        grpc_peers = [rule["from"] for rule in controller if {"port": "grpc"} in rule["ports"]]
        assert grpc_peers == [
            [
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mss-gateway"}}},
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mss-scheduler"}}},
            ]
        ]
        scheduler = one(overlay, "NetworkPolicy", "mss-scheduler")["spec"]["ingress"]
        replica_rules = [r for r in scheduler if any(p.get("port") == 50100 for p in r["ports"])]
        assert [r["from"] for r in replica_rules] == [
            [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mss-gateway"}}}]
        ]
        for rule in controller + scheduler:
            assert rule.get("from"), "an ingress rule without `from` admits every source"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_with_bounded_resources(overlay: str) -> None:
    for workload in workloads(overlay):
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] >= 10000, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        mounts = set()
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
            assert "hostPort" not in json.dumps(container.get("ports", [])), name
            mounts |= {m["mountPath"] for m in container["volumeMounts"]}
        # With a read-only root, whatever a process writes needs a volume.
        assert "/tmp" in mounts, name
    labels = one(overlay, "Namespace", "mss")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_is_a_valid_config_that_fits_the_schedulers(overlay: str) -> None:
    config = parse_config(config_text(overlay), f"{overlay} ConfigMap")
    scheduler = one(overlay, "DaemonSet", "mss-scheduler")
    container = pod_spec(scheduler)["containers"][0]
    _role, args = _parse(container)
    limits = container["resources"]["limits"]
    assert args.cpus == quantity(str(limits["cpu"]))
    assert args.memory_gib == quantity(str(limits["memory"])) / 2**30
    # The downward API cannot pass GPUs: --gpus must equal the device plugin's limit.
    assert args.gpus == int(limits.get("nvidia.com/gpu", 0))
    for deployment in config.deployments:
        wanted = deployment.resources
        assert wanted.cpus <= args.cpus and wanted.memory_gib <= args.memory_gib, deployment.name
        assert wanted.gpus <= args.gpus, f"{overlay}: {deployment.name} needs GPUs none offers"
    # Every pod that reads --config mounts the ConfigMap there.
    for workload, each in _containers(overlay):
        path = getattr(_parse(each)[1], "config", None)
        if path:
            mount = next(
                m for m in each["volumeMounts"] if m["mountPath"] == str(Path(path).parent)
            )
            volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
            assert volume["configMap"]["name"].startswith("mss-config"), volume


def test_gpu_overlay_places_cuda_schedulers_on_gpu_nodes_only() -> None:
    spec = pod_spec(one("gpu", "DaemonSet", "mss-scheduler"))
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["containers"][0]["image"].endswith("-cuda")
    for name in ("mss-controller", "mss-gateway"):
        workload = next(w for w in workloads("gpu") if w["metadata"]["name"] == name)
        assert pod_spec(workload)["containers"][0]["image"].endswith("-cpu"), name


# --- monitoring -------------------------------------------------------------------------


def test_prometheus_rule_is_alerts_yml() -> None:
    alerts_text = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    for overlay in OVERLAYS:
        rule = one(overlay, "PrometheusRule", "mss-alerts")
        assert rule["spec"]["groups"] == yaml.safe_load(alerts_text)["groups"], overlay
    jobs = set(re.findall(r'job="([^"]+)"', alerts_text))
    given = set()
    for kind in ("ServiceMonitor", "PodMonitor", "ScrapeConfig"):
        for obj in objects("cpu", kind):
            text = json.dumps(obj["spec"])
            given |= set(re.findall(r'"replacement": "(mss-[a-z]+)"', text))
            given |= set(re.findall(r'"regex": "(mss-[a-z]+)"', text))
    assert jobs == given, f"alerts use jobs {jobs}, the monitors make {given}"


def test_dashboards_are_config_maps_for_the_grafana_sidecar() -> None:
    maps = {cm["metadata"]["name"]: cm for cm in objects("cpu", "ConfigMap")}
    files = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
    assert files
    for path in files:
        cm = maps[f"mss-dashboard-{path.stem}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"][f"mss-{path.name}"]) == json.loads(path.read_text())
    datasource = yaml.safe_load(maps["mss-grafana-datasource"]["data"]["mss-datasource.yaml"])
    assert datasource["datasources"][0]["uid"] == "mss-prometheus"


def test_generated_files_are_fresh() -> None:
    generator = _generator()
    stale = [str(path) for path, text in generator.outputs().items() if path.read_text() != text]
    assert not stale, f"stale, run python deploy/kubernetes/generate.py: {stale}"
