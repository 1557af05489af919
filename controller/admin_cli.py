"""`mss status` and `mss scale`: command-line clients of the controller's admin RPCs.

`mss status` prints nodes, deployments and replicas as the controller sees
them, as tables (with each autoscaled deployment's bounds, load and the
autoscaler's last decision); `mss scale MODEL N` sets how many replicas a
deployment runs, and is refused for an autoscaled one (its bounds are in the
config).
Each command is a `Command` that `mss/cli.py` names as
`controller.admin_cli:status` and `controller.admin_cli:scale`. The answers are
built on the controller side by `controller/status.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from mss import security
from mss.config import ConfigError, load_config
from mss.replica_states import state_name
from mss.rpc import UNARY_CHANNEL_OPTIONS
from mss.rpc_auth import describe, sync_channel
from mss.security import Credentials, SecurityError
from protos import controller_pb2 as pb
from protos import controller_pb2_grpc


@dataclass(frozen=True, slots=True)
class Command:
    """What `mss/cli.py` needs of a subcommand: its arguments and its body."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_controller_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controller", default="127.0.0.1:50051", help="controller HOST:PORT")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    parser.add_argument("--config", help="cluster config whose `security` block to use")
    security.add_arguments(parser)


def _credentials(args: argparse.Namespace, command: str) -> Credentials | None:
    """The admin's credentials, or None after saying on stderr why there are none."""
    try:
        settings = load_config(args.config).security
        return security.credentials_from(args, settings, "admin", create=False)
    except (ConfigError, SecurityError) as exc:
        sys.stderr.write(f"mss {command}: {exc}\n")
        return None


def _channel(args: argparse.Namespace, creds: Credentials) -> grpc.Channel:
    return sync_channel(args.controller, creds, "controller", UNARY_CHANNEL_OPTIONS)


# ----- mss status ----------------------------------------------------------------------

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
    """The `mss status` tables; `now` (Unix time) dates the heartbeats."""
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
            _scaling_cell(d),
            d.engine,
            d.model_source,
            d.strategy,
        ]
        for d in status.deployments
    ]
    decisions = [_decision_line(d, now) for d in status.deployments if d.HasField("autoscaling")]
    replicas = [
        [
            r.status.replica_id,
            r.status.deployment,
            r.node_id,
            state_name(r.status.state) + ("" if r.keep else " (leaving)"),
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
        table(["NAME", "RUNNING", "AUTOSCALING", "ENGINE", "MODEL", "ROUTING"], deployments),
        *decisions,
        "",
        "REPLICAS",
        table(REPLICA_COLUMNS, replicas),
    ]
    return "\n".join(parts)


def _scaling_cell(d: pb.DeploymentStatus) -> str:
    """`0..4, 3 ongoing` for an autoscaled deployment (`scaled to zero` at 0), else `-`."""
    if not d.HasField("autoscaling"):
        return "-"
    a = d.autoscaling
    cell = f"{a.min_replicas}..{a.max_replicas}, {a.ongoing_requests:g} ongoing"
    if a.held_requests:
        cell += f", {a.held_requests} held"
    if d.target_replicas == 0 and d.running_replicas == 0:
        cell += ", scaled to zero"
    return cell


def _decision_line(d: pb.DeploymentStatus, now: float) -> str:
    """The autoscaler's last decision and reason, and when the target last changed."""
    a = d.autoscaling
    changed = (
        f"; target last changed {now - a.last_change_unix:.0f}s ago" if a.last_change_unix else ""
    )
    return f"  {d.name}: {a.last_direction or '-'}: {a.last_reason or '-'}{changed}"


def _run_status(args: argparse.Namespace) -> int:
    creds = _credentials(args, "status")
    if creds is None:
        return 2
    with _channel(args, creds) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        try:
            status = stub.Status(
                pb.StatusRequest(), timeout=args.timeout, metadata=creds.metadata()
            )
        except grpc.RpcError as exc:
            sys.stderr.write(f"mss status: controller {args.controller}: {describe(exc)}\n")
            return 1
    sys.stdout.write(render(status) + "\n")
    return 0


status = Command(add_arguments=_add_controller_arguments, run=_run_status)


# ----- mss scale -----------------------------------------------------------------------


def _add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="deployment name")
    parser.add_argument("replicas", type=int, help="replica count wanted (0 or more)")
    _add_controller_arguments(parser)


def _run_scale(args: argparse.Namespace) -> int:
    creds = _credentials(args, "scale")
    if creds is None:
        return 2
    with _channel(args, creds) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        try:
            reply = stub.Scale(
                pb.ScaleRequest(deployment=args.model, replicas=args.replicas),
                timeout=args.timeout,
                metadata=creds.metadata(admin=True),
            )
        except grpc.RpcError as exc:
            known = isinstance(exc, grpc.Call) and exc.code() in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            detail = exc.details() if isinstance(exc, grpc.Call) and known else describe(exc)
            sys.stderr.write(f"mss scale: {detail}\n")
            return 1
    d = reply.deployment
    sys.stdout.write(
        f"{d.name}: target {d.target_replicas} replicas ({d.running_replicas} running now)\n"
    )
    return 0


scale = Command(add_arguments=_add_scale_arguments, run=_run_scale)
