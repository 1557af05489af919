"""The controller's loop: reconcile, publish the routing table, persist, repeat.

This is the thin I/O wrapper around `DeploymentState`: the state decides, this
loop saves it to SQLite (in a worker thread) and hands the table to the
publisher. RPC handlers call `wake()` after a report or an admin call so a
replica that became ready is routed within milliseconds, not at the next tick.

Each tick's `DeploymentState.update()` steps the managers in turn: first
`NodeManager.update()` (controller/nodes.py), which declares dead a node
silent for `dead_after_s` = `heartbeat_interval_s * dead_after_heartbeats`
(controller settings) and drops its replicas, then the reconcile of each
deployment. A tick runs every `interval_s` at least, so a dead node is noticed
within `dead_after_s + interval_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from controller import metrics
from controller.deployment_state import DeploymentState
from controller.route_publisher import RoutePublisher
from controller.store import Snapshot, Store

log = logging.getLogger(__name__)


class ControlLoop:
    def __init__(
        self,
        state: DeploymentState,
        publisher: RoutePublisher,
        store: Store | None,
        interval_s: float = 0.5,
    ) -> None:
        self.state = state
        self.publisher = publisher
        self.store = store
        self.interval_s = interval_s
        self._wake = asyncio.Event()
        self._saved: Snapshot | None = None
        self._known_deployments: set[str] = set()
        self._known_states: set[tuple[str, str]] = set()

    def wake(self) -> None:
        self._wake.set()

    async def tick(self) -> None:
        """One step: reconcile, publish when the table changed, save when the state changed."""
        started = time.perf_counter()
        try:
            self.state.update()
        except Exception:
            log.exception("reconcile step failed; the next one retries")
        if not self.state.settling:
            # Before that, gateways keep the table they hold.
            self.publisher.publish(self.state.routing_models())
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        self._export_metrics()
        await self.save()

    async def save(self) -> None:
        if self.store is None:
            return
        snap = self.state.snapshot(self.publisher.version)
        if snap == self._saved:
            return
        try:
            await asyncio.to_thread(self.store.save, snap)
            self._saved = snap
        except Exception:
            log.exception("saving controller state to %s failed; retrying", self.store.path)

    def _export_metrics(self) -> None:
        metrics.ROUTING_TABLE_VERSION.set(self.publisher.version)
        metrics.NODES_ALIVE.set(sum(1 for n in self.state.nodes.values() if n.alive))
        names = set(self.state.deployments)
        for gone in self._known_deployments - names:
            metrics.TARGET_REPLICAS.remove(gone)
            metrics.RUNNING_REPLICAS.remove(gone)
            for family in (
                metrics.AUTOSCALER_ONGOING,
                metrics.AUTOSCALER_HELD,
                metrics.COLD_START_SECONDS,
            ):
                try:
                    family.remove(gone)
                except KeyError:
                    pass  # it did not autoscale
        self._known_deployments = names
        for name, record in self.state.deployments.items():
            metrics.TARGET_REPLICAS.labels(name).set(record.target)
            metrics.RUNNING_REPLICAS.labels(name).set(self.state.running_replicas(name))
            metrics.REPLICA_RESTARTS.labels(name)  # exported as 0 before the first restart
            if record.spec.autoscaling is not None:
                metrics.COLD_START_SECONDS.labels(name)  # exported empty before the first
                metrics.AUTOSCALER_ONGOING.labels(name).set(record.scaling.ongoing)
                metrics.AUTOSCALER_HELD.labels(name).set(record.scaling.held)
        counts = self.state.replica_counts()
        for key in self._known_states - set(counts):
            metrics.REPLICAS.remove(*key)
        self._known_states = set(counts)
        for (deployment, state), value in counts.items():
            metrics.REPLICAS.labels(deployment, state).set(value)
        events = self.state.take_events()
        for deployment, n in events.restarts.items():
            metrics.REPLICA_RESTARTS.labels(deployment).inc(n)
        for (deployment, direction, reason), n in events.decisions.items():
            metrics.AUTOSCALER_DECISIONS.labels(deployment, direction, reason).inc(n)
        for deployment, seconds in events.cold_starts:
            metrics.COLD_START_SECONDS.labels(deployment).observe(seconds)

    async def run(self) -> None:
        while True:
            await self.tick()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
