"""Desired versus actual replicas, and the reconcile step that closes the gap.

The controller decides; schedulers report and carry out. This module holds the
controller's whole view (deployments, nodes, replicas) and changes it only in
answer to reports (`register_node`, `heartbeat`), admin calls (`apply`,
`scale`) and the periodic `update()`. It performs no I/O: the caller persists
`snapshot()` and publishes `routing_models()`, so unit tests drive it with a
fake clock and no sleeps.

Replica states (protos/controller.proto `ReplicaState`), as the controller uses them:
- STARTING: placed on a node, not yet answering Health as ready (or its
  scheduler lost it and is starting it again). Not routed.
- RUNNING: the scheduler reports Health ready. Routed.
- UNHEALTHY: process alive but failing Health, or crashed and waiting for its
  scheduler's restart with backoff. Not routed.
- STOPPING: the controller wants it gone (`keep` false). It leaves the routing
  table at once; the scheduler is told to stop it only `route_grace_s` later,
  so gateways have the new table before the replica starts draining.
- STOPPED: reported gone; the record is dropped.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from controller.store import DeploymentRow, NodeRow, ReplicaRow, Snapshot
from mss.config import ControllerSettings, Deployment
from protos import controller_pb2 as pb

log = logging.getLogger(__name__)

STARTING = pb.STARTING
RUNNING = pb.RUNNING
UNHEALTHY = pb.UNHEALTHY
STOPPING = pb.STOPPING
STOPPED = pb.STOPPED
STATE_NAMES: dict[int, str] = {
    pb.REPLICA_STATE_UNSPECIFIED: "unknown",
    STARTING: "starting",
    RUNNING: "running",
    UNHEALTHY: "unhealthy",
    STOPPING: "stopping",
    STOPPED: "stopped",
}
_LIVE_REPORTS = (STARTING, RUNNING, UNHEALTHY)


def spec_key(deployment: Deployment) -> str:
    """What a running replica depends on; a change means its replicas are replaced.

    Routing, gateway admission limits and the replica count can change without
    restarting anything.
    """
    return deployment.model_dump_json(
        exclude={
            "replicas": True,
            "routing": True,
            "limits": {"max_in_flight", "max_queue", "max_tokens"},
        }
    )


@dataclass(slots=True)
class DeploymentRecord:
    spec: Deployment
    target: int
    applied_json: str
    """JSON of the deployment as the config last gave it (replica count included)."""


@dataclass(slots=True)
class NodeRecord:
    node_id: str
    host: str
    cpus: float
    memory_gib: float
    gpus: int
    metrics_address: str
    last_seen: float
    """State clock (monotonic) of the last register or heartbeat."""
    last_seen_unix: float = 0.0
    alive: bool = True


@dataclass(slots=True)
class ReplicaRecord:
    replica_id: str
    deployment: str
    node_id: str
    deployment_json: str
    spec_key: str
    cpus: float
    memory_gib: float
    gpus: int
    created: float
    state: int = STARTING
    keep: bool = True
    address: str = ""
    metrics_address: str = ""
    pid: int = 0
    restarts: int = 0
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    message: str = ""
    stop_after: float = 0.0
    """When `keep` is false: the time from which the scheduler is told to stop it."""


@dataclass(slots=True)
class Events:
    """Counts since the last `take_events()`, for metrics."""

    restarts: dict[str, int] = field(default_factory=dict)


class DeploymentState:
    """The controller's view and its reconcile step. Not thread-safe: one event loop."""

    def __init__(
        self,
        settings: ControllerSettings,
        clock: Callable[[], float] = time.monotonic,
        route_grace_s: float = 1.0,
        settle_s: float = 0.0,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.route_grace_s = route_grace_s
        self.settle_until = clock() + settle_s
        """Until then the controller only listens: after a (re)start, schedulers need a
        heartbeat to report the replicas they run. Acting sooner would place duplicates
        and publish tables that miss replicas that are in fact serving."""
        self.deployments: dict[str, DeploymentRecord] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.replicas: dict[str, ReplicaRecord] = {}
        self.events = Events()
        self._unplaceable: set[str] = set()

    @property
    def dead_after_s(self) -> float:
        return self.settings.heartbeat_interval_s * self.settings.dead_after_heartbeats

    # ----- desired state -------------------------------------------------------------

    def apply(self, deployments: Iterable[Deployment]) -> None:
        """Make `deployments` the desired set; those absent are removed.

        A deployment given exactly as last time keeps its current target, so a
        `scale` survives a controller restart with an unchanged config file.
        """
        wanted = {d.name: d for d in deployments}
        for name in list(self.deployments):
            if name not in wanted:
                log.info("deployment %s removed", name)
                del self.deployments[name]
        for name, spec in wanted.items():
            applied = spec.model_dump_json()
            record = self.deployments.get(name)
            if record is not None and record.applied_json == applied:
                continue
            if record is None:
                log.info("deployment %s added: %d replicas", name, spec.replicas)
            else:
                log.info("deployment %s changed: %d replicas", name, spec.replicas)
            self.deployments[name] = DeploymentRecord(spec, spec.replicas, applied)

    def scale(self, name: str, replicas: int) -> DeploymentRecord:
        """Set a deployment's target; raises KeyError for an unknown deployment."""
        record = self.deployments[name]
        if record.target != replicas:
            log.info("deployment %s scaled %d -> %d", name, record.target, replicas)
        record.target = replicas
        return record

    # ----- reports from schedulers ---------------------------------------------------

    def register_node(
        self, info: pb.NodeInfo, reports: Iterable[pb.ReplicaStatus]
    ) -> list[pb.ReplicaAssignment]:
        """A scheduler (re)joins; the replicas it offers are adopted when still wanted."""
        now = self.clock()
        node = self.nodes.get(info.node_id)
        if node is None or not node.alive:
            log.info(
                "node %s registered: host %s, %.1f CPUs, %.1f GiB, %d GPUs",
                info.node_id,
                info.host,
                info.cpus,
                info.memory_gib,
                info.gpus,
            )
        self.nodes[info.node_id] = NodeRecord(
            node_id=info.node_id,
            host=info.host,
            cpus=info.cpus,
            memory_gib=info.memory_gib,
            gpus=info.gpus,
            metrics_address=info.metrics_address,
            last_seen=now,
            last_seen_unix=time.time(),
        )
        self._absorb(info.node_id, list(reports))
        return self.assignments(info.node_id)

    def heartbeat(
        self, node_id: str, reports: Iterable[pb.ReplicaStatus]
    ) -> list[pb.ReplicaAssignment] | None:
        """Record a node's report; None when the node is unknown or was declared dead."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return None
        node.last_seen = self.clock()
        node.last_seen_unix = time.time()
        self._absorb(node_id, list(reports))
        return self.assignments(node_id)

    def _absorb(self, node_id: str, reports: list[pb.ReplicaStatus]) -> None:
        now = self.clock()
        seen: set[str] = set()
        for rep in reports:
            seen.add(rep.replica_id)
            rec = self.replicas.get(rep.replica_id)
            if rec is None:
                rec = self._adopt(node_id, rep)
                if rec is None:
                    continue
            if rec.node_id != node_id:
                log.warning(
                    "replica %s reported by node %s but placed on %s; ignored",
                    rep.replica_id,
                    node_id,
                    rec.node_id,
                )
                continue
            if rep.restarts > rec.restarts:
                delta = rep.restarts - rec.restarts
                self.events.restarts[rec.deployment] = (
                    self.events.restarts.get(rec.deployment, 0) + delta
                )
            rec.restarts = rep.restarts
            rec.address = rep.address
            rec.metrics_address = rep.metrics_address
            rec.pid = rep.pid
            rec.running = rep.load.running
            rec.waiting = rep.load.waiting
            rec.kv_cache_usage = rep.load.kv_cache_usage
            rec.message = rep.message
            if rec.keep:
                if rep.state != rec.state:
                    log.info(
                        "replica %s on %s: %s -> %s",
                        rec.replica_id,
                        node_id,
                        STATE_NAMES[rec.state],
                        STATE_NAMES[rep.state],
                    )
                rec.state = rep.state
            elif rep.state == STOPPED:
                log.info("replica %s on %s stopped", rec.replica_id, node_id)
                del self.replicas[rec.replica_id]
            else:
                rec.state = STOPPING
        for rec in [r for r in self.replicas.values() if r.node_id == node_id]:
            if rec.replica_id in seen:
                continue
            if not rec.keep:
                if now >= rec.stop_after:
                    del self.replicas[rec.replica_id]
            elif rec.state in (RUNNING, UNHEALTHY):
                log.info(
                    "replica %s no longer reported by %s; starting again", rec.replica_id, node_id
                )
                rec.state = STARTING
                rec.address = ""

    def _adopt(self, node_id: str, rep: pb.ReplicaStatus) -> ReplicaRecord | None:
        """Take over a replica the controller has no record of (its state was lost)."""
        record = self.deployments.get(rep.deployment)
        if rep.state not in _LIVE_REPORTS or record is None:
            return None
        spec = record.spec
        rec = ReplicaRecord(
            replica_id=rep.replica_id,
            deployment=rep.deployment,
            node_id=node_id,
            deployment_json=spec.model_dump_json(),
            spec_key=spec_key(spec),
            cpus=spec.resources.cpus,
            memory_gib=spec.resources.memory_gib,
            gpus=spec.resources.gpus,
            created=self.clock(),
            state=rep.state,
        )
        self.replicas[rec.replica_id] = rec
        log.info("adopted replica %s of %s on node %s", rec.replica_id, rec.deployment, node_id)
        return rec

    def assignments(self, node_id: str) -> list[pb.ReplicaAssignment]:
        """Every replica the controller wants on `node_id`, and those it wants gone."""
        now = self.clock()
        out = []
        for rec in sorted(self.replicas.values(), key=lambda r: r.replica_id):
            if rec.node_id != node_id:
                continue
            out.append(
                pb.ReplicaAssignment(
                    replica_id=rec.replica_id,
                    deployment=rec.deployment,
                    deployment_json=rec.deployment_json,
                    keep=rec.keep or now < rec.stop_after,
                    drain_timeout_s=self.settings.drain_timeout_s,
                )
            )
        return out

    # ----- reconcile -----------------------------------------------------------------

    @property
    def settling(self) -> bool:
        return self.clock() < self.settle_until

    def update(self) -> None:
        """One reconcile step: find dead nodes, then bring each deployment to its target."""
        if self.settling:
            return
        self._check_nodes()
        for name in sorted(self.deployments):
            try:
                self._reconcile(self.deployments[name])
            except Exception:
                log.exception("reconcile of deployment %s failed; next step retries", name)
        for rec in list(self.replicas.values()):
            if rec.deployment not in self.deployments and rec.keep:
                self._stop(rec, "its deployment was removed")

    def _check_nodes(self) -> None:
        now = self.clock()
        for node in self.nodes.values():
            if node.alive and now - node.last_seen > self.dead_after_s:
                node.alive = False
                gone = [r for r in self.replicas.values() if r.node_id == node.node_id]
                log.warning(
                    "node %s missed heartbeats for %.1f s: dead; %d replicas to reschedule",
                    node.node_id,
                    now - node.last_seen,
                    len(gone),
                )
                for rec in gone:
                    del self.replicas[rec.replica_id]

    def _reconcile(self, record: DeploymentRecord) -> None:
        spec = record.spec
        key = spec_key(spec)
        live = [r for r in self.replicas.values() if r.deployment == spec.name and r.keep]
        current = [r for r in live if r.spec_key == key]
        outdated = [r for r in live if r.spec_key != key]

        missing = record.target - len(current)
        for _ in range(max(0, missing)):
            if not self._place(spec):
                break

        surplus = len(current) - record.target
        if surplus > 0:
            for rec in self._victims(current)[:surplus]:
                self._stop(rec, f"scaling {spec.name} to {record.target}")

        # Rolling replacement: an outdated replica goes once enough current ones run.
        running_current = sum(1 for r in current if r.state == RUNNING)
        excess = running_current + len(outdated) - record.target
        for rec in self._victims(outdated)[: max(0, excess)]:
            self._stop(rec, f"replaced by the new spec of {spec.name}")

    def _victims(self, replicas: list[ReplicaRecord]) -> list[ReplicaRecord]:
        """Stop order: not serving first, then the node most crowded, then the newest."""
        per_node: dict[str, int] = {}
        for rec in replicas:
            per_node[rec.node_id] = per_node.get(rec.node_id, 0) + 1
        return sorted(
            replicas,
            key=lambda r: (r.state == RUNNING, -per_node[r.node_id], -r.created, r.replica_id),
        )

    def _stop(self, rec: ReplicaRecord, reason: str) -> None:
        log.info("stopping replica %s on %s: %s", rec.replica_id, rec.node_id, reason)
        rec.keep = False
        rec.state = STOPPING
        rec.stop_after = self.clock() + self.route_grace_s

    def free_capacity(self, node: NodeRecord) -> tuple[float, float, int]:
        """CPUs, GiB and GPUs of `node` not taken by replicas that hold resources."""
        cpus, mem, gpus = node.cpus, node.memory_gib, node.gpus
        for rec in self.replicas.values():
            if rec.node_id == node.node_id and rec.state != STOPPED:
                cpus -= rec.cpus
                mem -= rec.memory_gib
                gpus -= rec.gpus
        return cpus, mem, gpus

    def _place(self, spec: Deployment) -> bool:
        need = spec.resources
        candidates = []
        for node in self.nodes.values():
            if not node.alive:
                continue
            cpus, mem, gpus = self.free_capacity(node)
            eps = 1e-6
            if cpus + eps < need.cpus or mem + eps < need.memory_gib or gpus < need.gpus:
                continue
            mine = sum(
                1
                for r in self.replicas.values()
                if r.node_id == node.node_id and r.deployment == spec.name and r.keep
            )
            # Spread a deployment over nodes; keep GPU nodes for deployments that need GPUs.
            spare_gpus = gpus if need.gpus == 0 else 0
            candidates.append((mine, spare_gpus, -cpus, node.node_id))
        if not candidates:
            if not any(n.alive for n in self.nodes.values()):
                if "" not in self._unplaceable:
                    log.info("no node has registered yet; replicas wait for one")
                    self._unplaceable.add("")
                return False
            if spec.name not in self._unplaceable:
                log.warning(
                    "no node has room for a replica of %s (%.1f CPUs, %.1f GiB, %d GPUs)",
                    spec.name,
                    need.cpus,
                    need.memory_gib,
                    need.gpus,
                )
                self._unplaceable.add(spec.name)
            return False
        node_id = min(candidates)[3]
        self._unplaceable.discard(spec.name)
        self._unplaceable.discard("")
        rec = ReplicaRecord(
            replica_id=f"{spec.name}-{uuid.uuid4().hex[:8]}",
            deployment=spec.name,
            node_id=node_id,
            deployment_json=spec.model_dump_json(),
            spec_key=spec_key(spec),
            cpus=need.cpus,
            memory_gib=need.memory_gib,
            gpus=need.gpus,
            created=self.clock(),
        )
        self.replicas[rec.replica_id] = rec
        log.info("placed replica %s of %s on node %s", rec.replica_id, spec.name, node_id)
        return True

    # ----- views ---------------------------------------------------------------------

    def routing_models(self) -> list[pb.ModelRoutes]:
        """The routing table content: every deployment with its running, wanted replicas."""
        models = []
        for name in sorted(self.deployments):
            spec = self.deployments[name].spec
            routes = [
                pb.Route(
                    replica_id=r.replica_id,
                    address=r.address,
                    node_id=r.node_id,
                    metrics_address=r.metrics_address,
                )
                for r in sorted(self.replicas.values(), key=lambda r: r.replica_id)
                if r.deployment == name
                and r.keep
                and r.state == RUNNING
                and r.address
                and self.nodes.get(r.node_id, None) is not None
                and self.nodes[r.node_id].alive
            ]
            models.append(
                pb.ModelRoutes(
                    model=name,
                    strategy=spec.routing,
                    max_in_flight=spec.limits.max_in_flight,
                    max_queue=spec.limits.max_queue,
                    max_tokens=spec.limits.max_tokens,
                    routes=routes,
                )
            )
        return models

    def replica_counts(self) -> dict[tuple[str, str], int]:
        """(deployment, state name) -> replicas, for the controller's gauges."""
        counts: dict[tuple[str, str], int] = {}
        for name in self.deployments:
            for state in (STARTING, RUNNING, UNHEALTHY, STOPPING):
                counts[(name, STATE_NAMES[state])] = 0
        for rec in self.replicas.values():
            key = (rec.deployment, STATE_NAMES[rec.state])
            counts[key] = counts.get(key, 0) + 1
        return counts

    def take_events(self) -> Events:
        events, self.events = self.events, Events()
        return events

    # ----- persistence ---------------------------------------------------------------

    def snapshot(self, routing_version: int) -> Snapshot:
        return Snapshot(
            deployments=tuple(
                DeploymentRow(name, rec.spec.model_dump_json(), rec.applied_json, rec.target)
                for name, rec in sorted(self.deployments.items())
            ),
            nodes=tuple(
                NodeRow(n.node_id, n.host, n.cpus, n.memory_gib, n.gpus, n.metrics_address, n.alive)
                for n in sorted(self.nodes.values(), key=lambda n: n.node_id)
            ),
            replicas=tuple(
                ReplicaRow(
                    replica_id=r.replica_id,
                    deployment=r.deployment,
                    node_id=r.node_id,
                    deployment_json=r.deployment_json,
                    spec_key=r.spec_key,
                    state=r.state,
                    keep=r.keep,
                    address=r.address,
                    metrics_address=r.metrics_address,
                    pid=r.pid,
                    restarts=r.restarts,
                    cpus=r.cpus,
                    memory_gib=r.memory_gib,
                    gpus=r.gpus,
                )
                for r in sorted(self.replicas.values(), key=lambda r: r.replica_id)
            ),
            routing_version=routing_version,
        )

    def restore(self, snap: Snapshot) -> None:
        """Resume from a saved state. Nodes get a full dead-window to report again."""
        now = self.clock()
        self.deployments = {
            d.name: DeploymentRecord(
                Deployment.model_validate(json.loads(d.spec_json)), d.target, d.applied_json
            )
            for d in snap.deployments
        }
        self.nodes = {
            n.node_id: NodeRecord(
                node_id=n.node_id,
                host=n.host,
                cpus=n.cpus,
                memory_gib=n.memory_gib,
                gpus=n.gpus,
                metrics_address=n.metrics_address,
                last_seen=now,
                alive=n.alive,
            )
            for n in snap.nodes
        }
        self.replicas = {
            r.replica_id: ReplicaRecord(
                replica_id=r.replica_id,
                deployment=r.deployment,
                node_id=r.node_id,
                deployment_json=r.deployment_json,
                spec_key=r.spec_key,
                cpus=r.cpus,
                memory_gib=r.memory_gib,
                gpus=r.gpus,
                created=now,
                state=r.state,
                keep=r.keep,
                address=r.address,
                metrics_address=r.metrics_address,
                pid=r.pid,
                restarts=r.restarts,
                stop_after=now,
            )
            for r in snap.replicas
        }
        log.info(
            "restored %d deployments, %d nodes, %d replicas",
            len(self.deployments),
            len(self.nodes),
            len(self.replicas),
        )
