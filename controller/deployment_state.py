"""Desired versus actual replicas, and the reconcile step that closes the gap.

The controller decides; schedulers report and carry out. `DeploymentState` is
the controller's whole view and changes it only in answer to reports
(`register_node`, `heartbeat`, the gateways' `report_load`), admin calls
(`apply`, `scale`) and the periodic `update()`. It owns the desired state
(deployments and their targets), applies reports to the replica records and
reconciles each deployment; the other concerns sit in their own modules and
share one replica container:

- `controller/replicas.py`: the records, indexed by id, node and deployment;
- `controller/nodes.py`: node liveness, the dead-node timeout, and the fate of
  a dead node's replicas (`NodeManager.update()`);
- `controller/placement.py`: where a new replica goes, and stop order;
- `controller/autoscaler.py`: an autoscaled deployment's target, from its load
  (`controller/load_reports.py` keeps the gateways' reports).

It performs no I/O: the caller persists `snapshot()` and publishes
`routing_models()`, so unit tests drive it with a fake clock and no sleeps.

Replica states (`mss.replica_states`), as the controller uses them:
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

from controller.autoscaler import Decision, Memory, Signals, decide
from controller.load_reports import LoadReports
from controller.nodes import NodeManager, NodeRecord
from controller.placement import Placement, stop_order
from controller.replicas import ReplicaContainer, ReplicaRecord, spec_key
from controller.store import DeploymentRow, NodeRow, ReplicaRow, Snapshot, to_row
from mss.config import ControllerSettings, Deployment
from mss.replica_states import (
    LIVE,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPING,
    UNHEALTHY,
    state_name,
)
from protos import controller_pb2 as pb

log = logging.getLogger(__name__)


class Autoscaled(Exception):
    """`scale` on a deployment whose replica count follows the load; the message says why."""


@dataclass(slots=True)
class ScalingState:
    """What the autoscaler knows of one deployment between steps (not persisted)."""

    memory: Memory = field(default_factory=Memory)
    decision: Decision | None = None
    """The last step's decision."""
    changed_at: float | None = None
    """Clock time the target last changed."""
    ongoing: float = 0.0
    held: int = 0
    cold_start_began: float | None = None
    """Clock time the target left zero, until a replica runs."""
    warm_since: float | None = None
    """Clock time the last cold start ended (its first replica ran)."""


@dataclass(slots=True)
class DeploymentRecord:
    spec: Deployment
    target: int
    applied_json: str
    """JSON of the deployment as the config last gave it (replica count included)."""
    pending: str = ""
    """Why the last reconcile could not place a wanted replica; empty when it could."""
    scaling: ScalingState = field(default_factory=ScalingState)


@dataclass(slots=True)
class Events:
    """Counts since the last `take_events()`, for metrics."""

    restarts: dict[str, int] = field(default_factory=dict)
    decisions: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(deployment, direction, reason kind) -> autoscaler decisions that changed the target
    (and holds for want of room, once per episode)."""
    cold_starts: list[tuple[str, float]] = field(default_factory=list)
    """(deployment, seconds from leaving zero to the first running replica)."""


class DeploymentState:
    """The controller's view and its reconcile step. Not thread-safe: one event loop."""

    def __init__(
        self,
        settings: ControllerSettings,
        clock: Callable[[], float] = time.monotonic,
        route_grace_s: float = 1.0,
        settle_s: float = 0.0,
        load_expires_after_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.route_grace_s = route_grace_s
        self.settle_until = clock() + settle_s
        """Until then the controller only listens: after a (re)start, schedulers need a
        heartbeat to report the replicas they run. Acting sooner would place duplicates
        and publish tables that miss replicas that are in fact serving."""
        self.deployments: dict[str, DeploymentRecord] = {}
        self.replicas = ReplicaContainer()
        self.node_manager = NodeManager(settings, self.replicas, clock)
        self.placement = Placement(self.node_manager, self.replicas, clock)
        self.events = Events()
        self.loads = LoadReports(load_expires_after_s)
        """Gateways' load reports, the autoscaler's main signal."""

    @property
    def nodes(self) -> Mapping[str, NodeRecord]:
        """Every registered node by id, dead ones included."""
        return self.node_manager.nodes

    @property
    def dead_after_s(self) -> float:
        """Heartbeat silence after which a node is dead (see `controller/nodes.py`)."""
        return self.node_manager.dead_after_s

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
                self.deployments[name] = DeploymentRecord(spec, spec.replicas, applied)
                continue
            log.info("deployment %s changed: %d replicas", name, spec.replicas)
            target = spec.replicas
            if spec.autoscaling is not None and record.spec.autoscaling is not None:
                target = spec.autoscaling.clamp(record.target)  # the load decides, not the file
            self.deployments[name] = DeploymentRecord(spec, target, applied, scaling=record.scaling)

    def scale(self, name: str, replicas: int) -> DeploymentRecord:
        """Set a deployment's target; raises KeyError for an unknown deployment and
        `Autoscaled` for one whose count follows the load."""
        record = self.deployments[name]
        scaling = record.spec.autoscaling
        if scaling is not None:
            raise Autoscaled(
                f"deployment {name!r} is autoscaled ({scaling.min_replicas}..."
                f"{scaling.max_replicas} replicas, {record.target} wanted now): its count "
                "follows the load. Change autoscaling.min_replicas and max_replicas in the "
                "config and apply it, or remove its autoscaling block to scale by hand"
            )
        if record.target != replicas:
            log.info("deployment %s scaled %d -> %d", name, record.target, replicas)
        record.target = replicas
        return record

    # ----- reports from schedulers ---------------------------------------------------

    def register_node(
        self, info: pb.NodeInfo, reports: Iterable[pb.ReplicaStatus]
    ) -> list[pb.ReplicaAssignment]:
        """A scheduler (re)joins; the replicas it offers are adopted when still wanted."""
        self.node_manager.register(info)
        self._absorb(info.node_id, list(reports))
        return self.assignments(info.node_id)

    def heartbeat(
        self, node_id: str, reports: Iterable[pb.ReplicaStatus]
    ) -> list[pb.ReplicaAssignment] | None:
        """Record a node's report; None when the node is unknown or was declared dead."""
        if not self.node_manager.heartbeat(node_id):
            return None
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
                        state_name(rec.state),
                        state_name(rep.state),
                    )
                rec.state = rep.state
            elif rep.state == STOPPED:
                log.info("replica %s on %s stopped", rec.replica_id, node_id)
                self.replicas.remove(rec.replica_id)
            else:
                rec.state = STOPPING
        for rec in self.replicas.on_node(node_id):
            if rec.replica_id in seen:
                continue
            if not rec.keep:
                if now >= rec.stop_after:
                    self.replicas.remove(rec.replica_id)
            elif rec.state in (RUNNING, UNHEALTHY):
                log.info(
                    "replica %s no longer reported by %s; starting again", rec.replica_id, node_id
                )
                rec.state = STARTING
                rec.address = ""

    def _adopt(self, node_id: str, rep: pb.ReplicaStatus) -> ReplicaRecord | None:
        """Take over a replica the controller has no record of (its state was lost)."""
        record = self.deployments.get(rep.deployment)
        if rep.state not in LIVE or record is None:
            return None
        rec = ReplicaRecord.for_spec(rep.replica_id, record.spec, node_id, self.clock(), rep.state)
        self.replicas.add(rec)
        log.info("adopted replica %s of %s on node %s", rec.replica_id, rec.deployment, node_id)
        return rec

    def assignments(self, node_id: str) -> list[pb.ReplicaAssignment]:
        """Every replica the controller wants on `node_id`, and those it wants gone."""
        now = self.clock()
        return [
            pb.ReplicaAssignment(
                replica_id=rec.replica_id,
                deployment=rec.deployment,
                deployment_json=rec.deployment_json,
                keep=rec.keep or now < rec.stop_after,
                drain_timeout_s=self.settings.drain_timeout_s,
            )
            for rec in sorted(self.replicas.on_node(node_id), key=lambda r: r.replica_id)
        ]

    # ----- reconcile -----------------------------------------------------------------

    @property
    def settling(self) -> bool:
        return self.clock() < self.settle_until

    def update(self) -> None:
        """One reconcile step: find dead nodes, then bring each deployment to its target.

        Each part runs in its own try: one that fails is logged and retried at
        the next step without holding back the others.
        """
        if self.settling:
            return
        try:
            self.node_manager.update()
        except Exception:
            log.exception("node liveness check failed; next step retries")
        for name in sorted(self.deployments):
            try:
                self._autoscale(self.deployments[name])
            except Exception:
                log.exception("autoscaling of deployment %s failed; next step retries", name)
            try:
                self._reconcile(self.deployments[name])
            except Exception:
                log.exception("reconcile of deployment %s failed; next step retries", name)
        for name in sorted(self.replicas.deployment_names() - set(self.deployments)):
            for rec in self.replicas.of_deployment(name):
                if rec.keep:
                    self._stop(rec, "its deployment was removed")

    def _reconcile(self, record: DeploymentRecord) -> None:
        spec = record.spec
        key = spec_key(spec)
        live = [r for r in self.replicas.of_deployment(spec.name) if r.keep]
        current = [r for r in live if r.spec_key == key]
        outdated = [r for r in live if r.spec_key != key]

        missing = record.target - len(current)
        pending = ""
        for _ in range(max(0, missing)):
            if self.placement.place(spec) is None:
                pending = self.placement.shortage(spec)
                break
        if pending and not record.pending and spec.autoscaling is not None:
            self._count_decision(spec.name, "hold", "pending")
        record.pending = pending

        surplus = len(current) - record.target
        if surplus > 0:
            for rec in stop_order(current)[:surplus]:
                self._stop(rec, f"scaling {spec.name} to {record.target}")

        # Rolling replacement: an outdated replica goes once enough current ones run.
        running_current = sum(1 for r in current if r.state == RUNNING)
        excess = running_current + len(outdated) - record.target
        for rec in stop_order(outdated)[: max(0, excess)]:
            self._stop(rec, f"replaced by the new spec of {spec.name}")

    def report_load(self, gateway_id: str, models: list[pb.ModelLoad]) -> None:
        """A gateway's report of the requests it holds per model (replaces its last one)."""
        self.loads.record(gateway_id, models, self.clock())

    def _autoscale(self, record: DeploymentRecord) -> None:
        cfg = record.spec.autoscaling
        if cfg is None:
            return
        name = record.spec.name
        now = self.clock()
        state = record.scaling
        reported = self.loads.for_model(name, now)
        live = [r for r in self.replicas.of_deployment(name) if r.keep]
        on_replicas = sum(r.running + r.waiting for r in live)
        # Both count the same requests, seen from either end; the larger misses none.
        ongoing = max(reported.ongoing, on_replicas)
        ttft = reported.ttft_p95_s
        if state.cold_start_began is not None or (
            state.warm_since is not None and now - state.warm_since < self.loads.expires_after_s
        ):
            ttft = None  # held requests waited for a cold start, not for a slow replica
        signals = Signals(
            ongoing=ongoing,
            current=record.target,
            held=reported.held,
            ttft_p95_s=ttft,
            pending=record.pending,
        )
        decision = decide(cfg, signals, state.memory, now)
        state.memory = decision.memory
        state.decision = decision
        state.ongoing = ongoing
        state.held = reported.held
        if decision.target != record.target:
            log.info(
                "autoscaling %s: %d -> %d replicas: %s",
                name,
                record.target,
                decision.target,
                decision.reason,
            )
            self._count_decision(name, decision.direction, decision.kind)
            if record.target == 0:
                state.cold_start_began = now
            elif decision.target == 0:
                state.cold_start_began = None
            record.target = decision.target
            state.changed_at = now
        if state.cold_start_began is not None and any(r.state == RUNNING for r in live):
            self.events.cold_starts.append((name, now - state.cold_start_began))
            state.cold_start_began = None
            state.warm_since = now

    def _count_decision(self, name: str, direction: str, kind: str) -> None:
        key = (name, direction, kind)
        self.events.decisions[key] = self.events.decisions.get(key, 0) + 1

    def _stop(self, rec: ReplicaRecord, reason: str) -> None:
        log.info("stopping replica %s on %s: %s", rec.replica_id, rec.node_id, reason)
        rec.keep = False
        rec.state = STOPPING
        rec.stop_after = self.clock() + self.route_grace_s

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
                for r in sorted(self.replicas.of_deployment(name), key=lambda r: r.replica_id)
                if r.keep
                and r.state == RUNNING
                and r.address
                and self.node_manager.is_alive(r.node_id)
            ]
            cache = spec.response_cache
            model = pb.ModelRoutes(
                model=name,
                strategy=spec.routing,
                max_in_flight=spec.limits.max_in_flight,
                max_queue=spec.limits.max_queue,
                max_tokens=spec.limits.max_tokens,
                routes=routes,
                response_cache_ttl_s=cache.ttl_s if cache.enabled else 0,
                coalesce=cache.coalesce,
            )
            if spec.autoscaling is not None:
                model.autoscaled = True
                model.cold_start_timeout_s = spec.autoscaling.cold_start_timeout_s
                if not routes:
                    model.unavailable = self._unavailable(self.deployments[name])
            models.append(model)
        return models

    def _unavailable(self, record: DeploymentRecord) -> str:
        """Why no replica of a deployment with none running will serve soon; empty if one may."""
        if record.target == 0:
            return ""
        if record.pending:
            return f"no room for a replica: {record.pending}"
        for rec in sorted(self.replicas.of_deployment(record.spec.name), key=lambda r: r.created):
            if rec.keep and rec.state == UNHEALTHY:
                return f"replica {rec.replica_id} failed to start: {rec.message or 'unhealthy'}"
        return ""

    def running_replicas(self, name: str) -> int:
        """Replicas of deployment `name` that are wanted and RUNNING."""
        return sum(1 for r in self.replicas.of_deployment(name) if r.keep and r.state == RUNNING)

    def replica_counts(self) -> dict[tuple[str, str], int]:
        """(deployment, state name) -> replicas, for the controller's gauges."""
        counts: dict[tuple[str, str], int] = {}
        for name in self.deployments:
            for state in (STARTING, RUNNING, UNHEALTHY, STOPPING):
                counts[(name, state_name(state))] = 0
        for rec in self.replicas.values():
            key = (rec.deployment, state_name(rec.state))
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
                to_row(NodeRow, n) for n in sorted(self.nodes.values(), key=lambda n: n.node_id)
            ),
            replicas=tuple(
                to_row(ReplicaRow, r)
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
        self.node_manager.restore(NodeRecord(**asdict(n), last_seen=now) for n in snap.nodes)
        self.replicas.clear()
        for r in snap.replicas:
            self.replicas.add(ReplicaRecord(**asdict(r), created=now, stop_after=now))
        log.info(
            "restored %d deployments, %d nodes, %d replicas",
            len(self.deployments),
            len(self.nodes),
            len(self.replicas),
        )
