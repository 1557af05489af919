"""The controller's HTTP side: its own /metrics, and /targets for Prometheus to find the rest.

`/targets` answers in Prometheus' HTTP service-discovery format (`http_sd_configs`):
one group per scheduler and per replica the controller knows, with the
`__mss_job` label (`mss-scheduler` or `mss-replica`) that the bundled scrape
config turns into `job`, and the deployment, replica and node as labels.
Replicas that are leaving (stopping, stopped) are not listed, so a scale-down is
not mistaken for a replica going down.

The server runs in a daemon thread, like prometheus_client's own; the target
list is read on the event loop that owns the controller state (the state is not
thread-safe), with a short timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from controller.deployment_state import DeploymentState
from mss.replica_states import STOPPED, STOPPING

log = logging.getLogger(__name__)

TargetGroups = list[dict[str, object]]


def scrape_targets(state: DeploymentState) -> TargetGroups:
    """Scrape targets of every live scheduler and every replica not on its way out."""
    groups: TargetGroups = []
    for node in state.nodes.values():
        if node.alive and node.metrics_address:
            groups.append(
                {
                    "targets": [node.metrics_address],
                    "labels": {"__mss_job": "mss-scheduler", "node": node.node_id},
                }
            )
    for rec in state.replicas.values():
        if not rec.metrics_address or not rec.keep or rec.state in (STOPPING, STOPPED):
            continue
        groups.append(
            {
                "targets": [rec.metrics_address],
                "labels": {
                    "__mss_job": "mss-replica",
                    "deployment": rec.deployment,
                    "replica": rec.replica_id,
                    "node": rec.node_id,
                },
            }
        )
    return groups


def serve_metrics_and_targets(
    host: str,
    port: int,
    targets: Callable[[], TargetGroups],
    loop: asyncio.AbstractEventLoop,
) -> ThreadingHTTPServer:
    """Serve GET /metrics and GET /targets on host:port in a daemon thread."""

    async def read_targets() -> TargetGroups:
        return targets()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/targets":
                try:
                    future = asyncio.run_coroutine_threadsafe(read_targets(), loop)
                    body = orjson.dumps(future.result(timeout=2.0))
                except (RuntimeError, TimeoutError) as exc:
                    self._answer(503, f"targets unavailable: {exc!r}\n".encode(), "text/plain")
                    return
                self._answer(200, body, "application/json")
            else:
                self._answer(404, b"not found: try /metrics or /targets\n", "text/plain")

        def _answer(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("metrics http: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server
