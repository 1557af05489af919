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
import os
import signal
import time
import uuid

import grpc
from prometheus_client import start_http_server
from pydantic import ValidationError

from mss import security
from mss.config import (
    BUNDLED_MODEL,
    ConfigError,
    Deployment,
    SecuritySettings,
    format_validation_error,
)
from mss.gc_tuning import tune_gc
from mss.logs import setup_logging
from mss.processes import write_exit_reason
from mss.rpc import SERVER_OPTIONS
from mss.rpc_auth import REPLICA_RULES, AuthInterceptor, add_port
from protos import replica_pb2_grpc
from replica.engine import Engine, create_engine
from replica.model_store import ModelError
from replica.server import ReplicaService

log = logging.getLogger("replica")


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
    security.add_arguments(parser)


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
    try:
        creds = security.credentials_from(args, SecuritySettings(), "replica")
    except (ConfigError, security.SecurityError) as exc:
        log.error("%s", exc)
        return 2
    if deployment.engine == "vllm":
        set_engine_environment(deployment)
    return asyncio.run(serve(deployment, args, creds))


def set_engine_environment(deployment: Deployment) -> None:
    """The process-wide settings that vLLM and Hugging Face read only from the environment.

    Set once here, in the entry point, before either library is imported (the
    engine imports them when it starts); library modules never touch
    `os.environ`. The first two are defaults an operator can override.
    """
    # Models come from the model store, converted locally; never from the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM on CPU keeps one core for its front end by default; on a small node
    # that takes half the cores from the engine.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # The KV-cache size is passed to vLLM explicitly (engine_args.kv_cache_gib),
    # but vLLM's CPU platform lets this legacy variable override it: the
    # deployment decides, so the variable goes.
    legacy = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if legacy and legacy != f"{deployment.engine_args.kv_cache_gib:g}":
        log.info(
            "VLLM_CPU_KVCACHE_SPACE=%s ignored: the deployment's kv_cache_gib is %g",
            legacy,
            deployment.engine_args.kv_cache_gib,
        )


async def serve(
    deployment: Deployment, args: argparse.Namespace, creds: security.Credentials
) -> int:
    replica_id = args.replica_id or f"{deployment.name}-{uuid.uuid4().hex[:8]}"
    engine = create_engine(deployment)
    service = ReplicaService(
        engine, replica_id, deployment.limits.replica_max_in_flight, args.log_prompts
    )
    server = grpc.aio.server(
        options=SERVER_OPTIONS, interceptors=[AuthInterceptor(creds, REPLICA_RULES)]
    )
    replica_pb2_grpc.add_ReplicaServicer_to_server(service, server)
    port = add_port(server, f"{args.host}:{args.port}", creds)
    if port == 0:
        log.error("cannot listen on %s:%s", args.host, args.port)
        return 1
    await server.start()
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.host)
    log.info(
        "replica %s serving %s (%s engine) on %s:%d (%s)",
        replica_id,
        deployment.name,
        deployment.engine,
        args.host,
        port,
        security.describe_credentials(creds),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    code = 0
    loading = asyncio.create_task(_load(engine), name="engine-load")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is None:
        tune_gc()  # the engine, loaded and warm, stays out of every collection
        service.ready = True
        log.info("ready: %s on %s:%d", deployment.name, args.host, port)
        dead = asyncio.create_task(engine.dead.wait(), name="engine-death")
        await asyncio.wait({stopping, dead}, return_when=asyncio.FIRST_COMPLETED)
        dead.cancel()
        if engine.dead.is_set():
            # Health says not ready from now on; what is still in flight has failed
            # already. Exit with an error so the scheduler restarts this replica.
            log.error("engine died (%s); stopping so the replica is restarted", engine.death)
            code = 1
            await service.drain(min(args.drain_timeout, 2.0))
        else:
            log.info("stopping: draining up to %.0f s", args.drain_timeout)
            await service.drain(args.drain_timeout)
    elif loading.done():
        exc = loading.exception()
        if isinstance(exc, ModelError):
            log.error("cannot load model: %s", exc)
            write_exit_reason(f"cannot load model: {exc}")
        else:
            log.error("engine failed to start: %r", exc, exc_info=exc)
            write_exit_reason(f"engine failed to start: {exc!r}")
        code = 1
    else:
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
    stopping.cancel()
    await server.stop(grace=1.0)
    await engine.shutdown()
    log.info("replica %s stopped", replica_id)
    return code


async def _load(engine: Engine) -> None:
    """Start the engine, then warm its request path (`Engine.warm_up`) before serving."""
    await engine.start()
    started = time.monotonic()
    await engine.warm_up()
    log.info("request path warmed in %.2f s", time.monotonic() - started)
