"""`mss scheduler --controller HOST:PORT`: the node agent that runs replicas.

It registers the node's resources, runs the replicas the controller assigns,
reports their state and load, and restarts crashed ones with backoff. On
SIGTERM or Ctrl-C it drains and stops every replica before exiting; if it is
killed outright its replicas get SIGTERM from the kernel (parent-death signal).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess

import psutil
from prometheus_client import start_http_server

from mss import security
from mss.config import ConfigError, SecuritySettings
from mss.logs import setup_logging
from protos import controller_pb2 as pb
from scheduler import metrics
from scheduler.supervisor import Supervisor

# Nothing imported above may import grpc: see `run` (a unit test checks it).

log = logging.getLogger("scheduler")


def port_range(text: str) -> range:
    try:
        first, _, last = text.partition("-")
        start, stop = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST, got {text!r}") from None
    if not 0 < start <= stop < 65536:
        raise argparse.ArgumentTypeError(f"bad port range {text!r}")
    return range(start, stop + 1)


def detect_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controller", default="127.0.0.1:50051", help="controller HOST:PORT")
    parser.add_argument("--node-id", default=socket.gethostname(), help="unique name of this node")
    parser.add_argument("--host", default="127.0.0.1", help="host gateways use to reach replicas")
    parser.add_argument("--bind-host", help="address replicas listen on (default: --host)")
    parser.add_argument("--cpus", type=float, help="CPUs to offer (default: all)")
    parser.add_argument("--memory-gib", type=float, help="memory to offer (default: all)")
    parser.add_argument("--gpus", type=int, help="GPUs to offer (default: detected)")
    parser.add_argument("--replica-ports", type=port_range, default=port_range("50100-50199"))
    parser.add_argument("--replica-metrics-ports", type=port_range, default=port_range("9200-9299"))
    parser.add_argument("--metrics-port", type=int, default=9102, help="/metrics port, 0 for none")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    parser.add_argument("--log-level", default="INFO")
    security.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    setup_logging("scheduler", args.log_format, args.log_level)
    # The scheduler forks replicas (preexec_fn rules out vfork) while gRPC
    # threads run; gRPC's fork handlers are useless there and log a warning
    # at every start. gRPC reads this once, when it is first imported, so it
    # is set here before `serve` imports the modules that use gRPC.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    try:
        creds = security.credentials_from(args, SecuritySettings(), "scheduler")
    except (ConfigError, security.SecurityError) as exc:
        log.error("%s", exc)
        return 2
    return asyncio.run(serve(args, creds))


async def serve(args: argparse.Namespace, creds: security.Credentials) -> int:
    from scheduler.agent import NodeAgent
    from scheduler.launcher import ProcessLauncher

    gpus = detect_gpus() if args.gpus is None else args.gpus
    cpus = float(os.cpu_count() or 1) if args.cpus is None else args.cpus
    memory = psutil.virtual_memory().total / 2**30 if args.memory_gib is None else args.memory_gib
    bind_host = args.bind_host or args.host
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=bind_host)
    node = pb.NodeInfo(
        node_id=args.node_id,
        host=args.host,
        cpus=cpus,
        memory_gib=memory,
        gpus=gpus,
        metrics_address=f"{args.host}:{args.metrics_port}" if args.metrics_port else "",
    )
    launcher = ProcessLauncher(
        bind_host, args.host, args.replica_ports, args.replica_metrics_ports, creds, args.log_format
    )
    agent_box: list[NodeAgent] = []
    supervisor = Supervisor(launcher, gpus=gpus, on_change=lambda: agent_box[0].changed.set())
    agent = NodeAgent(args.controller, node, supervisor, creds)
    agent_box.append(agent)
    log.info(
        "node %s: %.1f CPUs, %.1f GiB, %d GPUs; controller %s (%s)",
        node.node_id,
        cpus,
        memory,
        gpus,
        args.controller,
        security.describe_credentials(creds),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def supervise() -> None:
        while True:
            await supervisor.update()
            for state, n in supervisor.state_counts().items():
                metrics.REPLICAS.labels(state).set(n)
            for deployment, n in supervisor.restart_events.items():
                metrics.REPLICA_RESTARTS.labels(deployment).inc(n)
            supervisor.restart_events.clear()
            await asyncio.sleep(0.25)

    tasks = [
        asyncio.create_task(supervise(), name="supervise"),
        asyncio.create_task(agent.run(), name="agent"),
    ]
    waiter = asyncio.create_task(stop.wait(), name="stop-signal")
    done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not waiter and task.exception() is not None:
            log.error("%s failed: %r", task.get_name(), task.exception(), exc_info=task.exception())
    log.info("scheduler stopping: draining %d replicas", len(supervisor.replicas))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    waiter.cancel()
    await shutdown(supervisor)
    await agent.close()
    await launcher.close()
    log.info("scheduler stopped")
    return 0


async def shutdown(supervisor: Supervisor) -> None:
    """Stop every replica: SIGTERM, wait for the drain, kill what remains."""
    supervisor.stop_all()
    while not supervisor.all_stopped():
        await supervisor.update()
        await asyncio.sleep(0.1)
