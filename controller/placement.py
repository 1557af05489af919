"""Where a new replica goes, and which replicas go first when some must stop.

Placement is greedy, one replica at a time, over live nodes with room for the
deployment's resources: spread a deployment over nodes, keep GPU nodes for
deployments that need GPUs, then prefer the node with the most spare CPUs.
Resources are the declared ones (`Deployment.resources`), not measured use; a
replica holds them until it is reported STOPPED or forgotten.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from controller.nodes import NodeManager, NodeRecord
from controller.replicas import ReplicaContainer, ReplicaRecord
from mss.config import Deployment
from mss.replica_states import RUNNING, STARTING, STOPPED

log = logging.getLogger(__name__)

_EPS = 1e-6
"""Slack for float arithmetic on CPUs and GiB: ten 0.1-CPU replicas fit on one CPU."""

_NO_NODES = ""
"""Key in `Placement._unplaceable` for "no node has registered yet"."""


class Placement:
    """Places replicas on live nodes and adds their records to the container."""

    def __init__(
        self,
        nodes: NodeManager,
        replicas: ReplicaContainer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nodes = nodes
        self.replicas = replicas
        self.clock = clock
        self._unplaceable: set[str] = set()
        """Deployments (or `_NO_NODES`) already logged as not fitting: log once per episode."""

    def free_capacity(self, node: NodeRecord) -> tuple[float, float, int]:
        """CPUs, GiB and GPUs of `node` not taken by replicas that hold resources."""
        cpus, mem, gpus = node.cpus, node.memory_gib, node.gpus
        for rec in self.replicas.on_node(node.node_id):
            if rec.state != STOPPED:
                cpus -= rec.cpus
                mem -= rec.memory_gib
                gpus -= rec.gpus
        return cpus, mem, gpus

    def place(self, spec: Deployment) -> ReplicaRecord | None:
        """Record a new STARTING replica of `spec` on the best node; None when none has room."""
        need = spec.resources
        candidates = []
        for node in self.nodes.alive():
            cpus, mem, gpus = self.free_capacity(node)
            if cpus + _EPS < need.cpus or mem + _EPS < need.memory_gib or gpus < need.gpus:
                continue
            mine = sum(
                1
                for r in self.replicas.on_node(node.node_id)
                if r.deployment == spec.name and r.keep
            )
            # Spread a deployment over nodes; keep GPU nodes for deployments that need GPUs.
            spare_gpus = gpus if need.gpus == 0 else 0
            candidates.append((mine, spare_gpus, -cpus, node.node_id))
        if not candidates:
            self._log_unplaceable(spec)
            return None
        node_id = min(candidates)[3]
        self._unplaceable.discard(spec.name)
        self._unplaceable.discard(_NO_NODES)
        rec = ReplicaRecord.for_spec(
            f"{spec.name}-{uuid.uuid4().hex[:8]}", spec, node_id, self.clock(), STARTING
        )
        self.replicas.add(rec)
        log.info("placed replica %s of %s on node %s", rec.replica_id, spec.name, node_id)
        return rec

    def shortage(self, spec: Deployment) -> str:
        """Why no live node can take a replica of `spec`: what none has free enough of."""
        nodes = self.nodes.alive()
        if not nodes:
            return "no node has registered"
        need = spec.resources
        free = [self.free_capacity(node) for node in nodes]
        wants = [
            (need.cpus, f"{need.cpus:g} CPUs", 0),
            (need.memory_gib, f"{need.memory_gib:g} GiB", 1),
            (need.gpus, f"{need.gpus} GPUs", 2),
        ]
        short = [text for amount, text, i in wants if all(f[i] + _EPS < amount for f in free)]
        if not short:  # each resource is free somewhere, never all on one node
            short = [text for amount, text, _ in wants if amount]
        return f"no node with {', '.join(short)} free"

    def _log_unplaceable(self, spec: Deployment) -> None:
        if not self.nodes.alive():
            if _NO_NODES not in self._unplaceable:
                log.info("no node has registered yet; replicas wait for one")
                self._unplaceable.add(_NO_NODES)
            return
        if spec.name not in self._unplaceable:
            need = spec.resources
            log.warning(
                "no node has room for a replica of %s (%.1f CPUs, %.1f GiB, %d GPUs)",
                spec.name,
                need.cpus,
                need.memory_gib,
                need.gpus,
            )
            self._unplaceable.add(spec.name)


def stop_order(replicas: list[ReplicaRecord]) -> list[ReplicaRecord]:
    """Stop order: not serving first, then the node most crowded, then the newest."""
    per_node: dict[str, int] = {}
    for rec in replicas:
        per_node[rec.node_id] = per_node.get(rec.node_id, 0) + 1
    return sorted(
        replicas,
        key=lambda r: (r.state == RUNNING, -per_node[r.node_id], -r.created, r.replica_id),
    )
