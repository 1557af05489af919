"""`mss gateway`: the HTTP/SSE front door under uvicorn (uvloop + httptools).

Routes come from the controller (`--controller HOST:PORT`) or, without one,
from static `--replica MODEL=HOST:PORT` flags that take each model's routing
and limits from `--config` (or the defaults). `--workers N` runs N processes
on one port; their metrics are merged through prometheus multiprocess mode.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from typing import Any

import uvicorn

from gateway.app import OPTIONS_ENV, create_app
from gateway.endpoints import GatewayOptions
from gateway.metrics import MULTIPROC_ENV
from gateway.routing import STRATEGIES
from mss.config import ConfigError, load_config
from mss.logs import setup_logging

log = logging.getLogger("gateway")

HTTP_PROTOCOL = "gateway.http_protocol:GatewayHttpProtocol"


def _replica(text: str) -> tuple[str, str]:
    model, sep, address = text.partition("=")
    host, colon, port = address.rpartition(":")
    if not sep or not model or not colon or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected MODEL=HOST:PORT, got {text!r}")
    return model, address


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="cluster config (YAML or JSON): gateway settings, deployments"
    )
    parser.add_argument(
        "--replica",
        action="append",
        type=_replica,
        default=[],
        metavar="MODEL=HOST:PORT",
        help="a replica to route to (repeatable); used when no --controller is given",
    )
    parser.add_argument("--controller", help="HOST:PORT of the controller to watch routes from")
    parser.add_argument("--host", default=None, help="listen address (config: gateway.host)")
    parser.add_argument("--port", type=int, default=None, help="listen port (config: gateway.port)")
    parser.add_argument("--workers", type=int, default=None, help="gateway processes on one port")
    parser.add_argument("--routing", choices=STRATEGIES, help="strategy for every static model")
    parser.add_argument(
        "--retries", type=int, default=None, help="other replicas tried before the first token"
    )
    parser.add_argument(
        "--replica-streams", type=int, default=1, help="Generate streams per replica"
    )
    parser.add_argument("--slow-client-timeout", type=float, default=None, help="seconds")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    setup_logging("gateway", args.log_format, args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    settings = config.gateway
    for attr, flag in (
        ("host", args.host),
        ("port", args.port),
        ("workers", args.workers),
        ("retries", args.retries),
        ("slow_client_timeout_s", args.slow_client_timeout),
    ):
        if flag is not None:
            setattr(settings, attr, flag)
    config = type(config).model_validate(config.model_dump())  # re-check the overridden values
    if args.controller and args.replica:
        log.warning("--controller given: the --replica flags are ignored")
    options = GatewayOptions(
        config=config,
        replicas=list(args.replica),
        controller=args.controller,
        routing=args.routing,
        workers=config.gateway.workers,
        replica_streams=args.replica_streams,
        log_format=args.log_format,
        log_level=args.log_level,
    )
    settings = config.gateway
    log.info(
        "gateway on %s:%d (%d worker%s), routes from %s",
        settings.host,
        settings.port,
        settings.workers,
        "s" if settings.workers > 1 else "",
        args.controller or f"{len(args.replica)} static replica(s)",
    )
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": HTTP_PROTOCOL,
        "loop": "uvloop",
        "ws": "none",
        "lifespan": "on",
        "log_config": None,
        "access_log": False,
        "proxy_headers": False,
        "timeout_graceful_shutdown": 30,
    }
    if settings.workers == 1:
        server = uvicorn.Server(uvicorn.Config(create_app(options), **common))
        server.run()
        return 0
    metrics_dir = tempfile.mkdtemp(prefix="mss-gateway-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    os.environ[OPTIONS_ENV] = options.to_json()
    try:
        uvicorn.run(
            "gateway.app:app_from_environment", factory=True, workers=settings.workers, **common
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
