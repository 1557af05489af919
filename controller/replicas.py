"""The controller's replica records, indexed by the questions a reconcile step asks.

A step asks "what runs on node N" (assignments, reports, free capacity, a dead
node) and "what serves deployment D" (reconcile, routing, status). The
container answers both from an index instead of scanning every replica, in
the manner of Ray Serve's `ReplicaStateContainer`.

Assumption: a record's `replica_id`, `deployment` and `node_id` never change
while it is in the container. A replica that has to run elsewhere is stopped
and a new one (with a new id) is placed; nothing moves a record. Everything
else on a record (state, load, `keep`...) may change in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from mss.config import Deployment
from mss.replica_states import STARTING


def spec_key(deployment: Deployment) -> str:
    """What a running replica depends on; a change means its replicas are replaced.

    Routing, gateway admission limits, the response cache, the replica count and
    its autoscaling can change without restarting anything.
    """
    return deployment.model_dump_json(
        exclude={
            "replicas": True,
            "autoscaling": True,
            "routing": True,
            "response_cache": True,
            "limits": {"max_in_flight", "max_queue", "max_tokens"},
        }
    )


@dataclass(slots=True)
class ReplicaRecord:
    """One replica as the controller knows it. The persisted part is `store.ReplicaRow`."""

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

    @classmethod
    def for_spec(
        cls, replica_id: str, spec: Deployment, node_id: str, created: float, state: int
    ) -> ReplicaRecord:
        """A new record of a replica of `spec` on `node_id`."""
        return cls(
            replica_id=replica_id,
            deployment=spec.name,
            node_id=node_id,
            deployment_json=spec.model_dump_json(),
            spec_key=spec_key(spec),
            cpus=spec.resources.cpus,
            memory_gib=spec.resources.memory_gib,
            gpus=spec.resources.gpus,
            created=created,
            state=state,
        )


class ReplicaContainer(Mapping[str, ReplicaRecord]):
    """Replica records by id (the mapping itself), by node and by deployment.

    Read it as a mapping; change membership only with `add`, `remove` and
    `clear`, which keep the three indexes in step. Iteration follows insertion.
    """

    def __init__(self, records: Iterable[ReplicaRecord] = ()) -> None:
        self._by_id: dict[str, ReplicaRecord] = {}
        self._by_node: dict[str, dict[str, ReplicaRecord]] = {}
        self._by_deployment: dict[str, dict[str, ReplicaRecord]] = {}
        for rec in records:
            self.add(rec)

    def __getitem__(self, replica_id: str) -> ReplicaRecord:
        return self._by_id[replica_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, rec: ReplicaRecord) -> None:
        """Hold `rec`; raises ValueError when its id is already held (ids are unique)."""
        if rec.replica_id in self._by_id:
            raise ValueError(f"replica {rec.replica_id!r} is already recorded")
        self._by_id[rec.replica_id] = rec
        self._by_node.setdefault(rec.node_id, {})[rec.replica_id] = rec
        self._by_deployment.setdefault(rec.deployment, {})[rec.replica_id] = rec

    def remove(self, replica_id: str) -> ReplicaRecord:
        """Forget a replica and return its record; raises KeyError when it is not held."""
        rec = self._by_id.pop(replica_id)
        _discard(self._by_node, rec.node_id, replica_id)
        _discard(self._by_deployment, rec.deployment, replica_id)
        return rec

    def clear(self) -> None:
        self._by_id.clear()
        self._by_node.clear()
        self._by_deployment.clear()

    def on_node(self, node_id: str) -> list[ReplicaRecord]:
        """Replicas on `node_id`, in insertion order (a copy: removing while looping is safe)."""
        return list(self._by_node.get(node_id, {}).values())

    def of_deployment(self, name: str) -> list[ReplicaRecord]:
        """Replicas of deployment `name`, in insertion order (a copy)."""
        return list(self._by_deployment.get(name, {}).values())

    def deployment_names(self) -> set[str]:
        """Deployments with at least one replica held."""
        return set(self._by_deployment)


def _discard(index: dict[str, dict[str, ReplicaRecord]], key: str, replica_id: str) -> None:
    bucket = index[key]
    del bucket[replica_id]
    if not bucket:
        del index[key]
