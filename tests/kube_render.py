"""Render the Kubernetes overlays in deploy/kubernetes/ and read the pods they describe.

Shared by the offline manifest checks (tests/unit/test_kubernetes_manifests.py)
and the wiring test that runs the rendered pods (tests/integration/
test_kubernetes_wiring.py). Tools come from the project's venv, the checkov
venv of `make checkov`, or PATH; a test that needs a missing one fails under
CI=true and is skipped elsewhere.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBE_DIR = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "fake")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
OLDEST_KUBERNETES = "1.30.0"
"""The oldest Kubernetes the manifests support (`preStop: sleep` is on by default from 1.30)."""

_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def require_tool(name: str, *candidates: Path) -> str:
    """Path of tool `name` (first of `candidates` that exists, else PATH); fail in CI, else skip."""
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    missing(f"{name} is not installed (`make install` and `make checkov` provide the tools)")


def require_module(name: str) -> ModuleType:
    """Import `name`; fail in CI when it is missing, else skip."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"the Python package {name} is not installed (`make install` provides it)")


def missing(message: str) -> NoReturn:
    """A tool or package a test needs is absent: a failure under CI=true, else a skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def kubectl() -> str:
    return require_tool("kubectl")


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """Every object `kubectl kustomize` renders for overlay `overlay`."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(KUBE_DIR / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [obj for obj in render(overlay) if obj["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in objects(overlay, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(overlay: str) -> list[dict[str, Any]]:
    return [obj for obj in render(overlay) if obj["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a matchLabels-style selector (or a Service's plain selector) matches `labels`."""
    assert "matchExpressions" not in selector, "only matchLabels selectors are used here"
    wanted = selector["matchLabels"] if "matchLabels" in selector else selector
    return all(labels.get(key) == value for key, value in wanted.items())


def config_text(overlay: str) -> str:
    """The cluster config file the overlay's ConfigMap holds."""
    maps = [
        cm
        for cm in objects(overlay, "ConfigMap")
        if cm["metadata"]["name"].startswith("mss-config")
    ]
    assert len(maps) == 1, f"{overlay}: expected one mss-config ConfigMap, found {len(maps)}"
    text: str = maps[0]["data"]["config.yaml"]
    return text


def resolve_env(container: dict[str, Any], field_values: dict[str, str]) -> dict[str, str]:
    """The container's environment with downward-API values filled in.

    `field_values` maps a fieldRef path (`status.podIP`) to the value the
    kubelet would give; a resourceFieldRef (`limits.cpu`) is the container's
    own quantity over the divisor, rounded up as the kubelet does.
    """
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[var["name"]] = field_values[source["fieldRef"]["fieldPath"]]
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            section, _, name = ref["resource"].partition(".")
            given = str(container["resources"][section][name])
            env[var["name"]] = divide(given, str(ref.get("divisor", "1")))
        else:
            raise AssertionError(f"unsupported env source {source!r}")
    return env


_SUFFIX = {
    "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40,
}  # fmt: skip


def quantity(text: str) -> float:
    """A Kubernetes quantity ("500m", "8Gi", "4") as a number."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text.strip())
    assert match and match.group(2) in _SUFFIX, f"unsupported quantity {text!r}"
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def divide(value: str, divisor: str) -> str:
    """What the kubelet puts in a resourceFieldRef variable: ceil(value / divisor)."""
    ratio = quantity(value) / quantity(divisor)
    whole = int(ratio) if ratio == int(ratio) else int(ratio) + 1
    return str(whole)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values; unknown names stay."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def unresolved(text: str) -> list[str]:
    return _VAR_REF.findall(text)


def python_for_mss() -> list[str]:
    """How to run the `mss` command the image's entry point names, from this checkout."""
    return [sys.executable, "-m", "mss.cli"]
