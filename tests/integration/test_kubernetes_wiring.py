"""The rendered Kubernetes pods, run for real: the manifests wire the system together.

`kubectl kustomize deploy/kubernetes/overlays/fake` is rendered (the CPU
overlay with the fake engine), and each pod it describes is started the way a
kubelet would start it, each in its own network namespace (made by
netns.py, found at ../shared/netns.py from the repository root; hosts
msk-h1..h6 on 10.211.0.0/24, apart from other tests' namespaces):
one controller pod (the StatefulSet), a scheduler pod on each of two "nodes"
(the DaemonSet) and two gateway pods (the HorizontalPodAutoscaler's minimum).
Every container runs exactly its rendered command, arguments and environment,
with what a cluster would supply filled in:

- downward-API values: `spec.nodeName` is the host's node name, `status.podIP`
  the namespace's address, and resourceFieldRefs are computed from the
  container's limits with their divisors (as the kubelet rounds);
- Service names: there is no cluster DNS, so each `SERVICE:PORT` (also
  `SERVICE.NAMESPACE.svc[.cluster.local]:PORT`) in the arguments and
  environment is rewritten to the IP of the one pod the Service selects and
  the container port its targetPort names;
- volumes: each volumeMount path in the arguments and environment is rewritten
  to a folder of the test's (a ConfigMap volume holds the ConfigMap's files, a
  Secret volume the files of the Secret the operator creates: the cluster
  token, fresh for each run, so every pod must read the one it is given);
- `mss`, the image's entry point, is this checkout's `python -m mss.cli`.

Then every startup and readiness probe of every pod must pass (run from the
pod's own namespace against its IP, as the kubelet does against the pod IP),
the controller must report both nodes with the CPUs and memory of their pod
limits and replicas at the scheduler pods' IPs, and a request must stream
through each gateway pod from a client on another host, served by a
fake-engine replica that a scheduler pod started. Finally one scheduler pod
is killed outright (a node lost): its replicas die with it and the controller
places them on the surviving node, and requests stream again.

NetworkPolicies are not enforced here (there is no CNI); the unit tests check
their selectors and ports. Needs root (network namespaces); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.kube_render import (
    ROOT,
    config_text,
    expand,
    missing,
    pod_labels,
    pod_spec,
    python_for_mss,
    render,
    resolve_env,
    selects,
    unresolved,
    workloads,
)

OVERLAY = "fake"
PREFIX = "msk"
NET = "10.211.0"
NODES = 2
"""Nodes the DaemonSet runs on: two, so one can be lost."""
CLIENT_HOST = 6
NETNS_SCRIPT = ROOT.parent / "shared" / "netns.py"
SECRETS = {"mss-cluster-token": {"cluster.token": secrets.token_urlsafe(32)}}
"""The Secrets an operator creates before applying the manifests (docs/kubernetes.md)."""


def _netns_env() -> dict[str, str]:
    return {**os.environ, "NETNS_PREFIX": PREFIX, "NETNS_NET": NET}


def _in_host(host: int, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", f"{PREFIX}-h{host}", *argv]


@dataclass
class Pod:
    """One rendered pod placed on one test host."""

    name: str
    host: int
    workload: dict[str, Any]
    node: str
    folder: Path
    proc: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def ip(self) -> str:
        return f"{NET}.{self.host}"

    @property
    def container(self) -> dict[str, Any]:
        containers: list[dict[str, Any]] = pod_spec(self.workload)["containers"]
        assert len(containers) == 1, f"{self.name}: one container per pod expected"
        return containers[0]

    def log(self) -> str:
        try:
            return (self.folder / "log.txt").read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def _pod_count(workload: dict[str, Any]) -> int:
    """Pods of a workload: one per node for a DaemonSet, the autoscaler's minimum if it has one."""
    if workload["kind"] == "DaemonSet":
        return NODES
    for hpa in render(OVERLAY):
        if hpa["kind"] == "HorizontalPodAutoscaler" and hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": workload["kind"],
            "name": workload["metadata"]["name"],
        }:
            return int(hpa["spec"]["minReplicas"])
    return int(workload["spec"].get("replicas", 1))


def _pods(tmp: Path) -> list[Pod]:
    """Each rendered pod on a host of its own: controller h1, schedulers h2-h3, gateways h4-h5."""
    pods: list[Pod] = []
    order = {"StatefulSet": 0, "DaemonSet": 1, "Deployment": 2}
    for workload in sorted(workloads(OVERLAY), key=lambda w: order[w["kind"]]):
        for index in range(_pod_count(workload)):
            host = len(pods) + 1
            name = f"{workload['metadata']['name']}-{index}"
            folder = tmp / name
            folder.mkdir()
            pods.append(Pod(name, host, workload, f"node-{host}", folder))
    assert len(pods) < CLIENT_HOST, "more pods than test hosts"
    return pods


def _service_rewrites(pods: list[Pod]) -> list[tuple[re.Pattern[str], str]]:
    """`SERVICE[.NS.svc[.cluster.local]]:PORT` to `POD_IP:CONTAINER_PORT`, per one-pod Service."""
    rewrites = []
    for service in (o for o in render(OVERLAY) if o["kind"] == "Service"):
        meta = service["metadata"]
        behind = [p for p in pods if selects(service["spec"]["selector"], pod_labels(p.workload))]
        if len(behind) != 1:
            continue  # clients of many-pod Services (gateways) are the test itself
        target = behind[0]
        named = {p["name"]: p["containerPort"] for p in target.container.get("ports", [])}
        for port in service["spec"]["ports"]:
            number = named.get(port["targetPort"], port["targetPort"])
            pattern = re.compile(
                rf"\b{re.escape(meta['name'])}(\.{re.escape(meta['namespace'])}\.svc"
                rf"(\.cluster\.local)?)?:{port['port']}\b"
            )
            rewrites.append((pattern, f"{target.ip}:{number}"))
    return rewrites


def _mounts(pod: Pod) -> dict[str, Path]:
    """Each volumeMount path of the pod and the test folder that stands for it."""
    spec = pod_spec(pod.workload)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in pod.workload["spec"].get("volumeClaimTemplates", [])}
    config_maps = {o["metadata"]["name"]: o for o in render(OVERLAY) if o["kind"] == "ConfigMap"}
    mounts: dict[str, Path] = {}
    for mount in pod.container.get("volumeMounts", []):
        folder = pod.folder / "volumes" / mount["name"]
        folder.mkdir(parents=True, exist_ok=True)
        volume = volumes.get(mount["name"])
        if volume is not None and "configMap" in volume:
            for key, text in config_maps[volume["configMap"]["name"]]["data"].items():
                (folder / key).write_text(text)
        elif volume is not None and "secret" in volume:
            for key, text in SECRETS[volume["secret"]["secretName"]].items():
                (folder / key).write_text(text)
                (folder / key).chmod(volume["secret"].get("defaultMode", 0o644))
        else:
            assert mount["name"] in claims or (volume and "emptyDir" in volume), mount
        mounts[mount["mountPath"]] = folder
    return mounts


def _wire(text: str, rewrites: list[tuple[re.Pattern[str], str]], mounts: dict[str, Path]) -> str:
    """`text` with Service addresses and volume paths (whole values or after `=`) replaced."""
    for pattern, replacement in rewrites:
        text = pattern.sub(replacement, text)
    if not mounts:
        return text
    paths = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
    return re.sub(rf"(^|=)({paths})(?=/|$)", lambda m: m.group(1) + str(mounts[m.group(2)]), text)


def _prepare(pod: Pod, rewrites: list[tuple[re.Pattern[str], str]]) -> None:
    container = pod.container
    assert container["command"] == ["mss"], container["command"]
    mounts = _mounts(pod)
    env = resolve_env(container, {"spec.nodeName": pod.node, "status.podIP": pod.ip})
    env = {name: _wire(value, rewrites, mounts) for name, value in env.items()}
    args = [_wire(expand(arg, env), rewrites, mounts) for arg in container["args"]]
    for arg in args:
        assert not unresolved(arg), f"{pod.name}: {arg} is left unexpanded"
    pod.argv = [*python_for_mss(), *args]
    pod.env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    if "/tmp" in mounts:
        pod.env["TMPDIR"] = str(mounts["/tmp"])


def _start(pod: Pod) -> None:
    log = (pod.folder / "log.txt").open("wb")
    pod.proc = subprocess.Popen(
        _in_host(pod.host, pod.argv),
        env=pod.env,
        cwd=pod.folder,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()


def _stop(pod: Pod, sig: int = signal.SIGTERM) -> None:
    """What the kubelet does: the signal, then SIGKILL after the grace period (bounded here)."""
    if pod.proc is None or pod.proc.poll() is not None:
        return
    os.killpg(pod.proc.pid, sig)
    grace = min(pod_spec(pod.workload).get("terminationGracePeriodSeconds", 30), 20)
    try:
        pod.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(pod.proc.pid, signal.SIGKILL)
        pod.proc.wait(timeout=10)


PROBE = textwrap.dedent(
    """
    import socket, sys, urllib.request
    kind, host, port, path = sys.argv[1:5]
    try:
        if kind == "tcp":
            socket.create_connection((host, int(port)), timeout=1).close()
        elif kind == "grpc":  # what the kubelet's grpc probe asks: grpc.health.v1 Check
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            with grpc.insecure_channel(f"{host}:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=path), timeout=2
                )
            sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
        else:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as r:
                sys.exit(0 if 200 <= r.status < 400 else 1)
    except Exception:  # refused, timed out, not serving: the probe fails
        sys.exit(1)
    """
)

STATUS = textwrap.dedent(
    """
    import json, sys, grpc
    from protos import controller_pb2 as pb, controller_pb2_grpc
    token = (("authorization", "Bearer " + sys.argv[2]),)
    with grpc.insecure_channel(sys.argv[1]) as channel:
        reply = controller_pb2_grpc.ControllerStub(channel).Status(
            pb.StatusRequest(), timeout=5, metadata=token
        )
    print(json.dumps({
        "nodes": [
            {"id": n.node.node_id, "host": n.node.host, "alive": n.alive, "cpus": n.node.cpus,
             "memory_gib": n.node.memory_gib, "gpus": n.node.gpus}
            for n in reply.nodes
        ],
        "replicas": [
            {"node": r.node_id, "address": r.status.address, "keep": r.keep,
             "state": pb.ReplicaState.Name(r.status.state)}
            for r in reply.replicas
        ],
    }))
    """
)

STREAM = textwrap.dedent(
    """
    import http.client, json, sys
    host, port, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    conn = http.client.HTTPConnection(host, port, timeout=20)
    body = json.dumps({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8})
    conn.request("POST", f"/v1/chat/{model}", body, {"Content-Type": "application/json"})
    reply = conn.getresponse()
    events = []
    for raw in reply:
        line = raw.decode().strip()
        if line.startswith("data:"):
            events.append(json.loads(line[5:]))
    print(json.dumps({"status": reply.status, "events": events}))
    """
)


def _run_in(
    host: int, code: str, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _in_host(host, [sys.executable, "-c", code, *args]),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _probe_passes(pod: Pod, probe: dict[str, Any]) -> bool:
    ports = {p["name"]: p["containerPort"] for p in pod.container.get("ports", [])}
    if "tcpSocket" in probe:
        port = probe["tcpSocket"]["port"]
        args = ["tcp", pod.ip, str(ports.get(port, port)), ""]
    elif "grpc" in probe:
        action = probe["grpc"]
        args = ["grpc", pod.ip, str(action["port"]), action.get("service", "")]
    else:
        action = probe["httpGet"]
        args = ["http", pod.ip, str(ports.get(action["port"], action["port"])), action["path"]]
    return _run_in(pod.host, PROBE, *args, timeout=10).returncode == 0


def _probe_check(pod: Pod, kind: str) -> Callable[[], bool]:
    probe = pod.container[kind]
    return lambda: _probe_passes(pod, probe)


def _wait(what: str, check: Callable[[], bool], pods: list[Pod], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in pods:
            if pod.proc is not None and pod.proc.poll() is not None:
                raise AssertionError(f"{pod.name} exited with {pod.proc.returncode}:\n{pod.log()}")
        if check():
            return
        time.sleep(0.3)
    logs = "\n".join(f"--- {p.name}\n{p.log()}" for p in pods)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def _status(controller: Pod) -> dict[str, Any]:
    grpc_port = next(p for p in controller.container["ports"] if p["name"] == "grpc")
    address = f"{controller.ip}:{grpc_port['containerPort']}"
    out = _run_in(CLIENT_HOST, STATUS, address, SECRETS["mss-cluster-token"]["cluster.token"])
    if out.returncode != 0:
        return {"nodes": [], "replicas": []}
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _stream(gateway: Pod, model: str) -> dict[str, Any]:
    port = next(p for p in gateway.container["ports"] if p["name"] == "http")["containerPort"]
    out = _run_in(CLIENT_HOST, STREAM, gateway.ip, str(port), model)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.fixture
def hosts() -> Iterator[None]:
    if os.geteuid() != 0:
        missing("network namespaces need root (CI runs as root)")
    if not NETNS_SCRIPT.is_file():
        missing(f"{NETNS_SCRIPT} not found")
    if shutil.which("ip") is None:
        pytest.fail("iproute2 (`ip`) is needed for network namespaces")
    up = subprocess.run(
        [sys.executable, str(NETNS_SCRIPT), "up", str(CLIENT_HOST)],
        env=_netns_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        assert up.returncode == 0, up.stderr
        yield
    finally:
        subprocess.run(
            [sys.executable, str(NETNS_SCRIPT), "down"],
            env=_netns_env(),
            capture_output=True,
            timeout=60,
            check=False,
        )


@pytest.mark.timeout(240)
def test_rendered_pods_serve_a_stream_and_survive_a_node_loss(hosts: None, tmp_path: Path) -> None:
    pods = _pods(tmp_path)
    rewrites = _service_rewrites(pods)
    for pod in pods:
        _prepare(pod, rewrites)
    controller = next(p for p in pods if p.workload["kind"] == "StatefulSet")
    schedulers = [p for p in pods if p.workload["kind"] == "DaemonSet"]
    gateways = [p for p in pods if p.workload["kind"] == "Deployment"]
    model = _fake_model()
    try:
        for pod in pods:
            _start(pod)

        for pod in pods:
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                _wait(f"{pod.name} {kind}", _probe_check(pod, kind), pods, 90)

        status = _status(controller)
        nodes = {n["id"]: n for n in status["nodes"]}
        for pod in schedulers:
            limits = pod.container["resources"]["limits"]
            node = nodes[pod.node]
            assert node["host"] == pod.ip and node["alive"], node
            assert node["cpus"] == float(limits["cpu"]), (node, limits)
            assert node["memory_gib"] == float(limits["memory"].removesuffix("Gi")), (node, limits)
        scheduler_ips = {p.ip for p in schedulers}
        running = [r for r in status["replicas"] if r["state"] == "RUNNING"]
        assert running and all(r["address"].split(":")[0] in scheduler_ips for r in running), status

        for gateway in gateways:
            _assert_streams(gateway, model)

        # A node is lost: its scheduler pod dies outright and its replicas with it.
        lost, survivor = schedulers
        _stop(lost, signal.SIGKILL)

        def moved() -> bool:
            current = _status(controller)
            on_survivor = [
                r
                for r in current["replicas"]
                if r["state"] == "RUNNING" and r["address"].startswith(survivor.ip + ":")
            ]
            return len(on_survivor) >= _replica_count()

        _wait("replicas placed on the surviving node", moved, [controller, survivor, *gateways], 60)
        _wait(
            "gateways ready again",
            lambda: all(_probe_check(g, "readinessProbe")() for g in gateways),
            [controller, survivor, *gateways],
            30,
        )
        for gateway in gateways:
            _assert_streams(gateway, model)
    finally:
        for pod in reversed(pods):
            _stop(pod)


def _fake_model() -> str:
    from mss.config import parse_config

    config = parse_config(config_text(OVERLAY), "fake overlay")
    assert all(d.engine == "fake" for d in config.deployments), "the wiring test needs no model"
    return config.deployments[0].name


def _replica_count() -> int:
    from mss.config import parse_config

    return parse_config(config_text(OVERLAY), "fake overlay").deployments[0].replicas


def _assert_streams(gateway: Pod, model: str) -> None:
    reply = _stream(gateway, model)
    events = reply["events"]
    assert reply["status"] == 200, reply
    tokens = [e["token"] for e in events if not e.get("finished")]
    assert len(tokens) >= 2 and "".join(tokens).strip(), events
    assert events[-1]["finished"] is True, events
