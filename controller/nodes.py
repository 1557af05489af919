"""Node liveness: which schedulers have joined, when each last reported, which are dead.

A node is dead once no register or heartbeat came for `dead_after_s`
(`heartbeat_interval_s * dead_after_heartbeats` of the controller settings).
`NodeManager.update()`, stepped by `DeploymentState.update()` from the control
loop, declares it so and forgets the replicas placed there: they may still be
running on a partitioned machine, but they are out of the routing table at
once and the reconcile step places replacements (new ids) on live nodes. A
dead node's next heartbeat is answered "unknown", so its scheduler registers
again and offers what it still runs: the replicas still wanted are adopted,
the surplus is stopped.

Times come from the state's injected clock (monotonic), so unit tests step
liveness with a fake clock; the wall-clock time is kept only for `mss status`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from controller.replicas import ReplicaContainer
from mss.config import ControllerSettings
from protos import controller_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(slots=True)
class NodeRecord:
    """One scheduler's node. The persisted part is `store.NodeRow`."""

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


class NodeManager:
    """Registers nodes, times their heartbeats, and declares the silent ones dead."""

    def __init__(
        self,
        settings: ControllerSettings,
        replicas: ReplicaContainer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.replicas = replicas
        """The shared container; a dead node's replicas are removed from it."""
        self.clock = clock
        self._nodes: dict[str, NodeRecord] = {}

    @property
    def nodes(self) -> Mapping[str, NodeRecord]:
        """Every node ever registered (dead ones included), by id. Read-only."""
        return self._nodes

    @property
    def dead_after_s(self) -> float:
        """Silence after which a node is declared dead."""
        return self.settings.heartbeat_interval_s * self.settings.dead_after_heartbeats

    def is_alive(self, node_id: str) -> bool:
        node = self._nodes.get(node_id)
        return node is not None and node.alive

    def alive(self) -> list[NodeRecord]:
        return [n for n in self._nodes.values() if n.alive]

    def register(self, info: pb.NodeInfo) -> None:
        """A scheduler (re)joins: its record is replaced and it is alive from now."""
        node = self._nodes.get(info.node_id)
        if node is None or not node.alive:
            log.info(
                "node %s registered: host %s, %.1f CPUs, %.1f GiB, %d GPUs",
                info.node_id,
                info.host,
                info.cpus,
                info.memory_gib,
                info.gpus,
            )
        self._nodes[info.node_id] = NodeRecord(
            node_id=info.node_id,
            host=info.host,
            cpus=info.cpus,
            memory_gib=info.memory_gib,
            gpus=info.gpus,
            metrics_address=info.metrics_address,
            last_seen=self.clock(),
            last_seen_unix=time.time(),
        )

    def heartbeat(self, node_id: str) -> bool:
        """Note that `node_id` reported; False when it is unknown or was declared dead."""
        node = self._nodes.get(node_id)
        if node is None or not node.alive:
            return False
        node.last_seen = self.clock()
        node.last_seen_unix = time.time()
        return True

    def update(self) -> None:
        """Declare dead every live node silent for more than `dead_after_s`; drop its replicas."""
        now = self.clock()
        for node in self._nodes.values():
            if not node.alive or now - node.last_seen <= self.dead_after_s:
                continue
            node.alive = False
            gone = self.replicas.on_node(node.node_id)
            log.warning(
                "node %s missed heartbeats for %.1f s: dead; %d replicas to reschedule",
                node.node_id,
                now - node.last_seen,
                len(gone),
            )
            for rec in gone:
                self.replicas.remove(rec.replica_id)

    def restore(self, nodes: Iterable[NodeRecord]) -> None:
        """Replace every record with `nodes` (from a saved state)."""
        self._nodes = {n.node_id: n for n in nodes}
