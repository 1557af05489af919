"""The scheduler's side of the controller protocol: register, heartbeat, carry out.

The agent reports what the supervisor runs and applies the assignments each
answer carries; it never decides placement. While the controller is
unreachable the agent keeps retrying (with a capped backoff) and the replicas
keep running untouched: only an answer from the controller starts or stops
anything. When the controller answers `known=false` (it lost the node or
declared it dead) the agent registers again, offering its running replicas
for adoption.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from mss.rpc import UNARY_CHANNEL_OPTIONS
from mss.rpc_auth import channel, describe
from mss.security import Credentials
from protos import controller_pb2 as pb
from protos import controller_pb2_grpc
from scheduler import metrics
from scheduler.supervisor import Supervisor

log = logging.getLogger(__name__)


class NodeAgent:
    """Registers this node, then heartbeats with its replicas' states and applies the answers."""

    def __init__(
        self,
        controller: str,
        node: pb.NodeInfo,
        supervisor: Supervisor,
        creds: Credentials,
        rpc_timeout_s: float = 3.0,
    ) -> None:
        self.controller = controller
        self.node = node
        self.supervisor = supervisor
        self.rpc_timeout_s = rpc_timeout_s
        self.interval_s = 2.0
        self.registered = False
        self.changed = asyncio.Event()
        # Unary calls with their own deadlines, and a reconnect within a second
        # after a controller restart (gRPC's default backoff grows to minutes,
        # long enough for the controller to declare this node dead).
        self._channel = channel(controller, creds, "controller", UNARY_CHANNEL_OPTIONS)
        self._metadata = creds.metadata()
        self._stub = controller_pb2_grpc.ControllerStub(self._channel)
        self._failing_since: float | None = None

    async def close(self) -> None:
        await self._channel.close()

    def apply(self, assignments: list[pb.ReplicaAssignment]) -> None:
        """Start what the controller wants kept, stop the rest, forget reported stops."""
        wanted: set[str] = set()
        for a in assignments:
            if a.keep:
                wanted.add(a.replica_id)
                self.supervisor.ensure(a.replica_id, a.deployment_json, a.drain_timeout_s)
            else:
                self.supervisor.stop(a.replica_id, a.drain_timeout_s)
        for replica_id in list(self.supervisor.replicas):
            if replica_id not in wanted:
                self.supervisor.stop(replica_id)
        self.supervisor.forget_stopped(wanted)

    async def exchange(self) -> None:
        """One register or heartbeat round trip; raises grpc.aio.AioRpcError on failure."""
        reports = self.supervisor.statuses()
        if not self.registered:
            reg = await self._stub.RegisterNode(
                pb.RegisterNodeRequest(node=self.node, replicas=reports),
                timeout=self.rpc_timeout_s,
                metadata=self._metadata,
            )
            self.registered = True
            if reg.heartbeat_interval_s > 0:
                self.interval_s = reg.heartbeat_interval_s
            log.info(
                "registered node %s with %s (%d replicas offered, %d assigned)",
                self.node.node_id,
                self.controller,
                len(reports),
                len(reg.assignments),
            )
            self.apply(list(reg.assignments))
            return
        beat = await self._stub.Heartbeat(
            pb.HeartbeatRequest(node_id=self.node.node_id, replicas=reports),
            timeout=self.rpc_timeout_s,
            metadata=self._metadata,
        )
        if not beat.known:
            log.warning("controller does not know node %s; registering again", self.node.node_id)
            self.registered = False
            await self.exchange()
            return
        self.apply(list(beat.assignments))

    async def run(self) -> None:
        """Report every interval, or at once when a replica changed state."""
        loop = asyncio.get_running_loop()
        backoff = 0.2
        while True:
            self.changed.clear()
            try:
                await self.exchange()
                if self._failing_since is not None:
                    log.info(
                        "controller %s reachable again after %.1f s",
                        self.controller,
                        loop.time() - self._failing_since,
                    )
                    self._failing_since = None
                backoff = 0.2
                wait = self.interval_s
            except grpc.aio.AioRpcError as exc:
                metrics.HEARTBEAT_FAILURES.inc()
                if self._failing_since is None:
                    self._failing_since = loop.time()
                    log.warning(
                        "controller %s: %s; replicas keep running, retrying",
                        self.controller,
                        describe(exc),
                    )
                wait = backoff
                backoff = min(backoff * 2, self.interval_s)
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=wait)
                await asyncio.sleep(0.05)  # coalesce a burst of changes into one report
            except TimeoutError:
                pass
