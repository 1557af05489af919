"""The Controller gRPC service (protos/controller.proto) over `DeploymentState`.

Every handler is idempotent: reports replace what the controller knew of a
node, and answers carry the node's full set of assignments or a whole routing
table. Handlers run on the same event loop as the control loop, so they read
and change the state without locks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from controller.control_loop import ControlLoop
from controller.deployment_state import Autoscaled, DeploymentState
from controller.route_publisher import RoutePublisher
from controller.status import deployment_status, status_response
from mss.config import ConfigError, parse_config
from protos import controller_pb2 as pb
from protos import controller_pb2_grpc

log = logging.getLogger(__name__)


class ControllerService(controller_pb2_grpc.ControllerServicer):
    def __init__(
        self, state: DeploymentState, publisher: RoutePublisher, loop: ControlLoop
    ) -> None:
        self.state = state
        self.publisher = publisher
        self.loop = loop

    def _reconcile_now(self) -> None:
        """Place or stop replicas before answering, so a report gets fresh assignments;
        the control loop then publishes and saves."""
        try:
            self.state.update()
        except Exception:
            log.exception("reconcile step failed; the control loop retries")
        self.loop.wake()

    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterNodeResponse:
        if not request.node.node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node.node_id is empty")
        self.state.register_node(request.node, request.replicas)
        self._reconcile_now()
        assignments = self.state.assignments(request.node.node_id)
        return pb.RegisterNodeResponse(
            heartbeat_interval_s=self.state.settings.heartbeat_interval_s, assignments=assignments
        )

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        if self.state.heartbeat(request.node_id, request.replicas) is None:
            return pb.HeartbeatResponse(known=False)
        self._reconcile_now()
        assignments = self.state.assignments(request.node_id)
        return pb.HeartbeatResponse(known=True, assignments=assignments)

    async def WatchRoutes(
        self, request: pb.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RoutingTable]:
        log.info("watcher %r subscribed at v%d", request.watcher_id, request.known_version)
        await context.send_initial_metadata(())  # lets the watcher know it is connected
        try:
            async for table in self.publisher.watch(request.known_version):
                yield table
        finally:
            log.info("watcher %r left", request.watcher_id)

    async def ReportLoad(
        self, request: pb.ReportLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportLoadResponse:
        self.state.report_load(request.gateway_id, list(request.models))
        if any(m.held for m in request.models):
            # A request held at zero replicas: start one now, not at the next tick.
            self._reconcile_now()
        return pb.ReportLoadResponse(expires_after_s=self.state.loads.expires_after_s)

    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatusResponse:
        return status_response(self.state, self.publisher.version)

    async def Scale(
        self, request: pb.ScaleRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScaleResponse:
        if request.replicas < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"replicas must be >= 0, got {request.replicas}"
            )
        try:
            self.state.scale(request.deployment, request.replicas)
        except Autoscaled as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except KeyError:
            known = ", ".join(sorted(self.state.deployments)) or "none"
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no deployment named {request.deployment!r} (known: {known})",
            )
        await self.loop.tick()
        return pb.ScaleResponse(deployment=deployment_status(self.state, request.deployment))

    async def ApplyConfig(
        self, request: pb.ApplyConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyConfigResponse:
        try:
            config = parse_config(request.config_text, "applied config")
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.state.apply(config.deployments)
        await self.loop.tick()
        return pb.ApplyConfigResponse(
            deployments=[
                deployment_status(self.state, name) for name in sorted(self.state.deployments)
            ]
        )
