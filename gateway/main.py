"""`mss gateway`: the HTTP/SSE front door under uvicorn (uvloop + httptools).

Routes come from the controller (`--controller HOST:PORT`) or, without one,
from static `--replica MODEL=HOST:PORT` flags that take each model's routing
and limits from `--config` (or the defaults). `--workers N` runs N processes
on one port; their metrics are merged through prometheus multiprocess mode.

This module is the entry point of every gateway process: `run` for the
command (and the one process of `--workers 1`), `app_from_environment` for
each worker process of `--workers N`. A gateway process's process-wide
settings (the garbage collector's, `mss.gc_tuning`) are made here and nowhere
else; a replica's are made in `replica.main`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import tempfile
from typing import Any

import uvicorn

from gateway.api_keys import all_keys
from gateway.app import GatewayApp, create_app
from gateway.gateway import GatewayOptions
from gateway.http_protocol import ConnectionLimits, protocol_factory
from gateway.metrics import MULTIPROC_ENV
from gateway.routing import STRATEGIES
from mss import security
from mss.config import ConfigError, load_config, with_overrides
from mss.gc_tuning import tune_gc
from mss.logs import setup_logging

log = logging.getLogger("gateway")

OPTIONS_ENV = "MSS_GATEWAY_OPTIONS"
"""How a worker process of `--workers N` gets its `GatewayOptions` (JSON)."""


def app_from_environment() -> GatewayApp:
    """The app of one worker process of `--workers N` (a uvicorn factory): the worker's entry point.

    Options travel in MSS_GATEWAY_OPTIONS, since uvicorn starts workers by import string.
    """
    options = GatewayOptions.from_json(os.environ[OPTIONS_ENV])
    setup_logging("gateway", options.log_format, options.log_level)
    app = create_app(options)
    tune_gc()
    return app


def _exit_after_drain(signum: int, frame: object) -> None:
    raise SystemExit(0)


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
    security.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    setup_logging("gateway", args.log_format, args.log_level)
    try:
        config = load_config(args.config)
        gateway = with_overrides(
            config.gateway,
            "command line",
            host=args.host,
            port=args.port,
            workers=args.workers,
            retries=args.retries,
            slow_client_timeout_s=args.slow_client_timeout,
        )
        all_keys(gateway)  # a bad keys file refuses the start, before any worker starts
        cluster = security.settings_from(args, config.security)
        creds = security.load_credentials(cluster, "gateway")
    except (ConfigError, security.SecurityError) as exc:
        log.error("%s", exc)
        return 2
    config = config.model_copy(update={"gateway": gateway, "security": cluster})
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
    https = cluster.https_cert_file is not None
    log.info(
        "gateway on %s://%s:%d (%d worker%s), routes from %s (%s)",
        "https" if https else "http",
        settings.host,
        settings.port,
        settings.workers,
        "s" if settings.workers > 1 else "",
        args.controller or f"{len(args.replica)} static replica(s)",
        security.describe_credentials(creds),
    )
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": protocol_factory(
            settings.client_send_buffer_bytes,
            ConnectionLimits(
                header_timeout_s=settings.header_timeout_s,
                body_timeout_s=settings.body_timeout_s,
                max_connections=settings.max_connections,
            ),
        ),
        "timeout_keep_alive": settings.idle_timeout_s,
        "loop": "uvloop",
        "ws": "none",
        "lifespan": "on",
        "log_config": None,
        "access_log": False,
        "proxy_headers": False,
        "timeout_graceful_shutdown": 30,
    }
    if https:
        common["ssl_certfile"] = os.path.expanduser(str(cluster.https_cert_file))
        common["ssl_keyfile"] = os.path.expanduser(str(cluster.https_key_file))
    # uvicorn catches SIGTERM, drains (open streams finish, up to the graceful
    # timeout), puts back the handler it found and raises the signal again; this
    # handler makes that end a clean exit (status 0) rather than death by signal.
    signal.signal(signal.SIGTERM, _exit_after_drain)
    if settings.workers == 1:
        server = uvicorn.Server(uvicorn.Config(create_app(options), **common))
        tune_gc()
        server.run()
        return 0
    metrics_dir = tempfile.mkdtemp(prefix="mss-gateway-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    os.environ[OPTIONS_ENV] = options.to_json()
    try:
        uvicorn.run(
            "gateway.main:app_from_environment", factory=True, workers=settings.workers, **common
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
