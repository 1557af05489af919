"""`mss replica`: one engine behind a gRPC server, with its own /metrics.

The gRPC server starts first and answers Health as not ready while the model
loads, so a scheduler can tell "loading" from "dead". SIGTERM drains: new
requests are refused, in-flight ones finish until the deadline, the rest are
cancelled, then the engine shuts down (its worker processes with it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import uuid

import grpc
from prometheus_client import start_http_server
from pydantic import ValidationError

from mss.config import BUNDLED_MODEL, Deployment, format_validation_error
from mss.logs import setup_logging
from protos import replica_pb2_grpc
from replica.engine import create_engine
from replica.model_store import ModelError
from replica.server import ReplicaService

log = logging.getLogger("replica")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deployment-json", help="JSON of a deployment; overrides the flags below")
    parser.add_argument("--name", default=BUNDLED_MODEL, help="model name clients use")
    parser.add_argument("--model", default=None, help="smollm2, an HF folder or a .gguf file")
    parser.add_argument("--engine", choices=["vllm", "fake"], default="vllm")
    parser.add_argument("--token-interval-ms", type=float, default=10.0, help="fake engine only")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-in-flight", type=int, default=None, help="requests admitted at once")
    parser.add_argument("--replica-id", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50100, help="gRPC port (0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, default=0, help="/metrics port (0: none)")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--log-prompts",
        action="store_true",
        help="log each rendered prompt (debugging only: prompts are never logged otherwise)",
    )


def deployment_from_args(args: argparse.Namespace) -> Deployment:
    if args.deployment_json:
        return Deployment.model_validate_json(args.deployment_json)
    raw: dict[str, object] = {"name": args.name, "engine": args.engine}
    raw["model"] = args.model or (BUNDLED_MODEL if args.engine == "vllm" else "fake")
    engine_args: dict[str, object] = {"token_interval_ms": args.token_interval_ms}
    if args.max_model_len:
        engine_args["max_model_len"] = args.max_model_len
    raw["engine_args"] = engine_args
    if args.max_in_flight:
        raw["limits"] = {"replica_max_in_flight": args.max_in_flight}
    return Deployment.model_validate(raw)


def run(args: argparse.Namespace) -> int:
    setup_logging("replica", args.log_format, args.log_level)
    try:
        deployment = deployment_from_args(args)
    except ValidationError as exc:
        log.error("invalid deployment:\n%s", format_validation_error(exc))
        return 2
    return asyncio.run(serve(deployment, args))


async def serve(deployment: Deployment, args: argparse.Namespace) -> int:
    replica_id = args.replica_id or f"{deployment.name}-{uuid.uuid4().hex[:8]}"
    engine = create_engine(deployment)
    service = ReplicaService(
        engine, replica_id, deployment.limits.replica_max_in_flight, args.log_prompts
    )
    server = grpc.aio.server(options=GRPC_OPTIONS)
    replica_pb2_grpc.add_ReplicaServicer_to_server(service, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        log.error("cannot listen on %s:%s", args.host, args.port)
        return 1
    await server.start()
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.host)
    log.info(
        "replica %s serving %s (%s engine) on %s:%d",
        replica_id,
        deployment.name,
        deployment.engine,
        args.host,
        port,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    code = 0
    loading = asyncio.create_task(engine.start(), name="engine-load")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is None:
        service.ready = True
        log.info("ready: %s on %s:%d", deployment.name, args.host, port)
        await stopping
        log.info("stopping: draining up to %.0f s", args.drain_timeout)
        await service.drain(args.drain_timeout)
    elif loading.done():
        exc = loading.exception()
        if isinstance(exc, ModelError):
            log.error("cannot load model: %s", exc)
        else:
            log.error("engine failed to start: %r", exc, exc_info=exc)
        code = 1
    else:
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
    stopping.cancel()
    await server.stop(grace=1.0)
    await engine.shutdown()
    log.info("replica %s stopped", replica_id)
    return code
