"""`mss controller`: the head controller (gRPC service, reconcile loop, SQLite state, /metrics).

At start the controller loads its saved state, then applies the config file if
one is given (a deployment unchanged since the last apply keeps its scaled
replica count). With neither saved state nor a file it serves one replica of
the bundled model. Schedulers that still run replicas report them within a
heartbeat and those replicas are kept, not restarted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from controller.control_loop import ControlLoop
from controller.deployment_state import DeploymentState
from controller.route_publisher import RoutePublisher
from controller.scrape_targets import scrape_targets, serve_metrics_and_targets
from controller.server import ControllerService
from controller.store import Store
from mss import security
from mss.config import (
    ClusterConfig,
    ConfigError,
    ControllerSettings,
    load_config,
    with_overrides,
)
from mss.logs import setup_logging
from mss.rpc import SERVER_OPTIONS
from mss.rpc_auth import CONTROLLER_RULES, AuthInterceptor, add_port
from mss.security import Credentials, SecurityError, describe_credentials
from protos import controller_pb2_grpc

log = logging.getLogger("controller")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="deployments file (YAML or JSON)")
    parser.add_argument("--host", help="address to listen on (default from config: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (default from config: 50051)")
    parser.add_argument("--metrics-port", type=int, help="/metrics port, 0 for none (default 9101)")
    parser.add_argument(
        "--state", help="SQLite state file (default ~/.cache/mss/controller.sqlite)"
    )
    parser.add_argument("--heartbeat-interval", type=float, help="seconds between heartbeats")
    parser.add_argument("--dead-after", type=int, help="missed heartbeats before a node is dead")
    parser.add_argument("--drain-timeout", type=float, help="seconds a stopping replica may drain")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    parser.add_argument("--log-level", default="INFO")
    security.add_arguments(parser)


def settings_from(args: argparse.Namespace, config: ClusterConfig) -> ControllerSettings:
    return with_overrides(
        config.controller,
        "command line",
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        state_path=args.state,
        heartbeat_interval_s=args.heartbeat_interval,
        dead_after_heartbeats=args.dead_after,
        drain_timeout_s=args.drain_timeout,
    )


def run(args: argparse.Namespace) -> int:
    setup_logging("controller", args.log_format, args.log_level)
    try:
        config = load_config(args.config)
        settings = settings_from(args, config)
        creds = security.credentials_from(args, config.security, "controller")
    except (ConfigError, SecurityError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    if creds.insecure:
        log.warning(
            "security is off: anyone who reaches %s:%d controls this cluster",
            settings.host,
            settings.port,
        )
    return asyncio.run(serve(settings, config if args.config else None, creds))


async def serve(
    settings: ControllerSettings, config: ClusterConfig | None, creds: Credentials
) -> int:
    store = Store(settings.state_path)
    snap = await asyncio.to_thread(store.load)
    # Every live scheduler reports within one heartbeat interval (and re-registers
    # if this controller does not know it), so after 1.5 intervals the view is whole.
    state = DeploymentState(settings, settle_s=1.5 * settings.heartbeat_interval_s)
    if snap is not None:
        state.restore(snap)
    publisher = RoutePublisher(snap.routing_version if snap else 0)
    if config is not None:
        state.apply(config.deployments)
    elif snap is None:
        state.apply(ClusterConfig().deployments)
    loop = ControlLoop(state, publisher, store)
    await loop.tick()

    server = grpc.aio.server(
        options=SERVER_OPTIONS, interceptors=[AuthInterceptor(creds, CONTROLLER_RULES)]
    )
    controller_pb2_grpc.add_ControllerServicer_to_server(
        ControllerService(state, publisher, loop), server
    )
    # The standard health service, for probes (Kubernetes' grpc probe, grpc_health_probe).
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{settings.host}:{settings.port}"
    port = add_port(server, address, creds)
    if port == 0:
        log.error("cannot listen on %s (in use?)", address)
        store.close()
        return 1
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    if settings.metrics_port:
        serve_metrics_and_targets(
            settings.host,
            settings.metrics_port,
            lambda: scrape_targets(state),
            asyncio.get_running_loop(),
        )
    log.info(
        "controller on %s:%d (%s), state %s, metrics port %s",
        settings.host,
        port,
        describe_credentials(creds),
        store.path,
        settings.metrics_port or "off",
    )

    stop = asyncio.Event()
    aio_loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        aio_loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(loop.run(), name="control-loop")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if runner.done() and not runner.cancelled() and runner.exception() is not None:
        log.error("control loop failed: %r", runner.exception(), exc_info=runner.exception())
    log.info("controller stopping")
    await health.enter_graceful_shutdown()
    runner.cancel()
    stopping.cancel()
    await asyncio.gather(runner, stopping, return_exceptions=True)
    publisher.close()
    await server.stop(grace=1.0)
    await loop.save()
    store.close()
    log.info("controller stopped")
    return 0
