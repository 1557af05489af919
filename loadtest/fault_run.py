"""Faults under closed-loop streaming load, one after another, and a table per phase.

    python -m loadtest.fault_run [--clients 24] [--phase-s 4] [--partition-s 15] [--json F]

Builds the cluster of `loadtest.fault_cluster` (controller, two nodes with two
fake-engine replicas each, a gateway; in network namespaces when run as root,
else on 127.0.0.1), starts the clients, and goes through the phases:

- baseline: nothing happens;
- replica_kill: `kill -9` of one replica of node n1 (its scheduler restarts it);
- scheduler_kill: `kill -9` of n1's scheduler, whose replicas die with it
  (told by the kernel, they drain for 0.2 s and go); the scheduler is started
  again at once and its node gets its replicas back;
- controller_kill: `kill -9` of the controller, 2 s without one (the gateway
  serves with its last routing table), then a new controller on the same state;
- partition (network namespaces only): n1's link is down for `--partition-s`
  seconds, then up again; the controller declares n1 dead after 5 s and places
  its replicas on n2;
- recovery: nothing happens.

A fault phase lasts until the cluster is whole again, at least `--phase-s`.
Each request counts in the phase in which it ended (a fault strikes as its
phase begins, so the streams it interrupts count there): ok, cut (an HTTP failure or an
error event), wrong (text differs from an uninterrupted run's) or hung (no
end within 30 s). TTFT and ITL are the streamed requests' (time to the first
text, gaps between texts), max stall the longest wait for a stream's next
text, the first included. Recovery is the time from the fault until the
controller reports the replicas whole again (the killed replica restarted,
n1's replicas running again, a controller answering with every replica, the
cut node's replicas replaced); moved counts the gateway's migrations.

As root the run happens in hosts made by `../shared/netns.py` (from the
repository root): the script makes them, runs itself again on the client
host, and removes them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from loadtest.fault_cluster import (
    CLIENT_HOST,
    NETNS_PREFIX,
    NETNS_SCRIPT,
    NODE_HOSTS,
    ROOT,
    Cluster,
    Hosts,
    Load,
    netns,
    references,
    summarize,
    table,
)
from protos import controller_pb2 as pb

RECOVERY_WITHIN_S = 40.0
CONTROLLER_GONE_S = 2.0


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


class FaultRun:
    """The phases, in order, over one cluster and one set of clients."""

    def __init__(self, cluster: Cluster, load: Load, phase_s: float, partition_s: float) -> None:
        self.cluster = cluster
        self.load = load
        self.phase_s = phase_s
        self.partition_s = partition_s
        self.extras: dict[str, dict[str, object]] = {}

    async def phase(self, name: str, fault: Callable[[], Awaitable[float | None]]) -> None:
        """Run `fault` (which returns its recovery time) as phase `name`, at least phase_s long."""
        self.load.phase = name
        before = await self.cluster.migrations()
        started = time.monotonic()
        recovery = await fault()
        await asyncio.sleep(max(0.0, started + self.phase_s - time.monotonic()))
        after = await self.cluster.migrations()
        moved = after.get("moved", 0.0) - before.get("moved", 0.0)
        gave_up = after.get("gave_up", 0.0) - before.get("gave_up", 0.0)
        self.extras[name] = {"recovery_s": recovery, "moved": moved, "gave_up": gave_up}
        print(f"{name}: done (recovery {recovery}, moved {moved:.0f})", file=sys.stderr)

    async def _until(self, what: str, check: Callable[[pb.StatusResponse], bool]) -> float:
        started = time.monotonic()
        await self.cluster.wait_for(what, check, RECOVERY_WITHIN_S)
        return time.monotonic() - started

    async def nothing(self) -> float | None:
        return None

    async def replica_kill(self) -> float:
        status = await self.cluster.status()
        victim = next(r for r in self.cluster.running(status) if r.node_id == "n1")
        os.kill(victim.status.pid, signal.SIGKILL)

        def restarted(s: pb.StatusResponse) -> bool:
            back = [
                r
                for r in self.cluster.running(s)
                if r.status.replica_id == victim.status.replica_id
            ]
            return self.cluster.full(s) and bool(back) and back[0].status.pid != victim.status.pid

        return await self._until("the killed replica restarted", restarted)

    async def scheduler_kill(self) -> float:
        status = await self.cluster.status()
        old = {r.status.pid for r in self.cluster.running(status) if r.node_id == "n1"}
        self.cluster.kill("n1")
        started = time.monotonic()
        self.cluster.start_scheduler(0)

        def back(s: pb.StatusResponse) -> bool:
            pids = {r.status.pid for r in self.cluster.running(s) if r.node_id == "n1"}
            return self.cluster.spread(s) and not pids & old and not any(map(pid_alive, old))

        await self.cluster.wait_for("n1's replicas back", back, RECOVERY_WITHIN_S)
        return time.monotonic() - started

    async def controller_kill(self) -> float:
        self.cluster.kill("controller")
        started = time.monotonic()
        await asyncio.sleep(CONTROLLER_GONE_S)
        self.cluster.start_controller()
        await self.cluster.wait_for(
            "a controller with every replica", self.cluster.full, RECOVERY_WITHIN_S
        )
        return time.monotonic() - started

    async def partition(self) -> float:
        status = await self.cluster.status()
        old = {r.status.replica_id for r in self.cluster.running(status) if r.node_id == "n1"}
        cut = NODE_HOSTS[0]
        healed = False
        self.cluster.hosts.cut(cut)

        def recovered(s: pb.StatusResponse) -> bool:
            # Replaced on the other node; or, after a partition shorter than the
            # dead-node window and a start, running again where they were.
            running = {r.status.replica_id for r in self.cluster.running(s)}
            return self.cluster.full(s) and (healed or not running & old)

        try:
            waiting = asyncio.create_task(self._until("n1's replicas replaced", recovered))
            await asyncio.sleep(self.partition_s)
        finally:
            self.cluster.hosts.heal(cut)
            healed = True
        recovery = await waiting  # timed from the cut: the task started with it
        await self.cluster.wait_for(
            "n1 back", lambda s: any(n.node.node_id == "n1" and n.alive for n in s.nodes), 30
        )
        return recovery


async def run(
    hosts: Hosts, folder: Path, clients: int, phase_s: float, partition_s: float
) -> tuple[list[dict[str, object]], float]:
    """The phases' rows, and the requests the gateway still held after the last answer."""
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)  # stop it all
    cluster = Cluster(folder, hosts)
    try:
        await cluster.start()
        load = Load(cluster.url, clients, await references(cluster.url, clients))
        faults = FaultRun(cluster, load, phase_s, partition_s)
        load.start("baseline")
        await faults.phase("baseline", faults.nothing)
        await faults.phase("replica_kill", faults.replica_kill)
        await faults.phase("scheduler_kill", faults.scheduler_kill)
        await faults.phase("controller_kill", faults.controller_kill)
        if hosts.netns:
            await faults.phase("partition", faults.partition)
        await faults.phase("recovery", faults.nothing)
        await load.stop()
        rows = [summarize(name, load.records, extra) for name, extra in faults.extras.items()]
        return rows, await cluster.in_flight_after_load()
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=24, help="closed-loop clients")
    parser.add_argument("--phase-s", type=float, default=4.0, help="shortest phase, seconds")
    parser.add_argument("--partition-s", type=float, default=15.0, help="how long n1 is cut off")
    parser.add_argument(
        "--hosts",
        choices=["auto", "netns", "local"],
        default="auto",
        help="network namespaces (needs root; auto when root) or everything on 127.0.0.1",
    )
    parser.add_argument(
        "--folder", help="where the processes' logs go (default: a new temp folder)"
    )
    parser.add_argument("--json", help="also write the rows here as JSON")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_netns = args.hosts == "netns" or (args.hosts == "auto" and os.geteuid() == 0)
    if use_netns and not args.inside:
        return _on_client_host()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="mss-faults-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"logs in {folder}", file=sys.stderr)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows, held = asyncio.run(
        run(Hosts(use_netns), folder, args.clients, args.phase_s, args.partition_s)
    )
    hosts = "network namespaces" if use_netns else "127.0.0.1"
    print(f"{started}, {args.clients} clients, hosts in {hosts}")
    print(table(rows))
    print(f"requests the gateway still held after the last answer: {held:.0f}")
    if args.json:
        result = {"started": started, "clients": args.clients, "hosts": hosts, "rows": rows}
        result["in_flight_after"] = held
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _on_client_host() -> int:
    """Make the hosts, run this script again on the client host, remove the hosts."""
    if os.geteuid() != 0:
        print("network namespaces need root; use --hosts local", file=sys.stderr)
        return 2
    if not NETNS_SCRIPT.is_file():
        print(f"{NETNS_SCRIPT} not found", file=sys.stderr)
        return 2
    up = netns("up", str(CLIENT_HOST))
    try:
        if up.returncode != 0:
            print(f"netns.py up: {up.stderr}", file=sys.stderr)
            return 2
        argv = [sys.executable, "-m", "loadtest.fault_run", *sys.argv[1:], "--inside"]
        host = f"{NETNS_PREFIX}-h{CLIENT_HOST}"
        child = subprocess.Popen(["ip", "netns", "exec", host, *argv], cwd=ROOT)
        # Told to stop, the run stops its cluster first; the hosts go after it.
        signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        return child.wait()
    finally:
        netns("down")


if __name__ == "__main__":
    sys.exit(main())
