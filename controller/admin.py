"""`mss status`: nodes, deployments and replicas as the controller sees them, as tables."""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from controller.deployment_state import STATE_NAMES
from protos import controller_pb2 as pb
from protos import controller_pb2_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controller", default="127.0.0.1:50051", help="controller HOST:PORT")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")


REPLICA_COLUMNS = "REPLICA DEPLOYMENT NODE STATE ADDRESS RUN WAIT KV RESTARTS MESSAGE".split()


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def render(status: pb.StatusResponse, now: float | None = None) -> str:
    now = time.time() if now is None else now
    nodes = [
        [
            n.node.node_id,
            n.node.host,
            "alive" if n.alive else "dead",
            f"{n.node.cpus:g}",
            f"{n.node.memory_gib:.1f}",
            str(n.node.gpus),
            f"{now - n.last_heartbeat_unix:.1f}s ago" if n.last_heartbeat_unix else "-",
        ]
        for n in status.nodes
    ]
    deployments = [
        [
            d.name,
            f"{d.running_replicas}/{d.target_replicas}",
            d.engine,
            d.model_source,
            d.strategy,
        ]
        for d in status.deployments
    ]
    replicas = [
        [
            r.status.replica_id,
            r.status.deployment,
            r.node_id,
            STATE_NAMES.get(r.status.state, "unknown") + ("" if r.keep else " (leaving)"),
            r.status.address or "-",
            str(r.status.load.running),
            str(r.status.load.waiting),
            f"{r.status.load.kv_cache_usage * 100:.0f}%",
            str(r.status.restarts),
            r.status.message,
        ]
        for r in status.replicas
    ]
    parts = [
        f"routing table v{status.routing_version}",
        "",
        "NODES",
        table(["NODE", "HOST", "STATE", "CPUS", "MEM_GIB", "GPUS", "HEARTBEAT"], nodes),
        "",
        "DEPLOYMENTS",
        table(["NAME", "RUNNING", "ENGINE", "MODEL", "ROUTING"], deployments),
        "",
        "REPLICAS",
        table(REPLICA_COLUMNS, replicas),
    ]
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.controller) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        try:
            status = stub.Status(pb.StatusRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            sys.stderr.write(f"mss status: controller {args.controller}: {exc.details()}\n")
            return 1
    sys.stdout.write(render(status) + "\n")
    return 0
