"""The control plane with real processes: controller, two schedulers, gateway, fake replicas.

Each test starts its own cluster on free ports with a temporary state file and
kills everything at teardown. Load runs through the gateway's HTTP API
(`/v1/chat/<model>`, streamed) while replicas, schedulers and the controller
are killed, restarted and scaled.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import orjson
import pytest
import yaml

from protos import controller_pb2 as pb
from protos import controller_pb2_grpc
from tests.support import (
    ROOT,
    Proc,
    engine_env,
    free_port,
    member_channel,
    scheduler_args,
    spawn,
)

HEARTBEAT_S = 0.5
DEAD_AFTER = 6  # 3 s of silence


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_pid_gone(pid: int, within: float) -> None:
    deadline = time.monotonic() + within
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def run_mss(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mss.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=engine_env(),
    )


@dataclass
class Cluster:
    tmp: Path
    replicas: int = 2
    controller_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)
    port_base: int = field(default_factory=lambda: random.randrange(20000, 40000, 200))

    @property
    def controller(self) -> str:
        return f"127.0.0.1:{self.controller_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def write_config(self, **overrides: object) -> Path:
        deployment: dict[str, object] = {
            "name": "echo",
            "model": "fake",
            "engine": "fake",
            "replicas": self.replicas,
            "engine_args": {"token_interval_ms": 20},
            "resources": {"cpus": 0.5, "memory_gib": 0.5},
            "routing": "least_loaded",
        }
        deployment.update(overrides)
        config = {
            "deployments": [deployment],
            "controller": {
                "host": "127.0.0.1",
                "port": self.controller_port,
                "metrics_port": 0,
                "state_path": str(self.tmp / "controller.sqlite"),
                "heartbeat_interval_s": HEARTBEAT_S,
                "dead_after_heartbeats": DEAD_AFTER,
                "drain_timeout_s": 5,
            },
            "gateway": {"host": "127.0.0.1", "port": self.gateway_port},
        }
        path = self.tmp / "cluster.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start_controller(self) -> Proc:
        proc = spawn(["controller", "--config", str(self.tmp / "cluster.yaml")], "controller")
        self.procs["controller"] = proc
        return proc

    def start_scheduler(self, node_id: str, index: int) -> Proc:
        base = self.port_base + index * 50
        proc = spawn(
            scheduler_args(self.controller, node_id, base),
            f"scheduler-{node_id}",
        )
        self.procs[f"scheduler-{node_id}"] = proc
        return proc

    def start_gateway(self) -> Proc:
        proc = spawn(
            [
                "gateway",
                "--controller",
                self.controller,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.gateway_port),
            ],
            "gateway",
        )
        self.procs["gateway"] = proc
        return proc

    async def status(self) -> pb.StatusResponse:
        async with member_channel(self.controller) as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            return await stub.Status(pb.StatusRequest(), timeout=2.0)

    async def wait_for(
        self, what: str, check: Callable[[pb.StatusResponse], bool], within: float = 30.0
    ) -> pb.StatusResponse:
        deadline = time.monotonic() + within
        last: pb.StatusResponse | None = None
        while time.monotonic() < deadline:
            try:
                last = await self.status()
                if check(last):
                    return last
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last status:\n{last}\n{self.logs()}")

    async def wait_gateway_ready(self, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                try:
                    if (await http.get(f"{self.url}/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"gateway not ready\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.log()[-2500:]}" for n, p in self.procs.items())

    def stop_all(self) -> None:
        for name in ("gateway", *[n for n in self.procs if n.startswith("sched")], "controller"):
            proc = self.procs.get(name)
            if proc is not None:
                proc.stop(timeout=20)


def running(status: pb.StatusResponse, deployment: str = "echo") -> list[pb.ReplicaView]:
    return [
        r
        for r in status.replicas
        if r.status.deployment == deployment and r.keep and r.status.state == pb.RUNNING
    ]


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    detail: str = ""


class Load:
    """Closed-loop streaming clients through the gateway; every request's outcome is kept."""

    def __init__(self, url: str, model: str = "echo", clients: int = 4) -> None:
        self.url = url
        self.model = model
        self.clients = clients
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def one(self, http: httpx.AsyncClient) -> Outcome:
        started = time.monotonic()
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
        try:
            async with http.stream("POST", f"{self.url}/v1/chat/{self.model}", json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    return Outcome(started, time.monotonic(), False, f"{resp.status_code} {text}")
                last: dict[str, object] = {}
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        last = orjson.loads(line[6:])
            reason = last.get("finish_reason")
            ok = bool(last.get("finished")) and reason in ("length", "stop")
            return Outcome(started, time.monotonic(), ok, "" if ok else f"ended with {last}")
        except httpx.HTTPError as exc:
            return Outcome(started, time.monotonic(), False, repr(exc))

    async def _client(self) -> None:
        async with httpx.AsyncClient(timeout=30.0) as http:
            while not self._stop.is_set():
                self.outcomes.append(await self.one(http))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def failures(self, after: float = 0.0) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok and o.started >= after]

    def answered(self, after: float = 0.0) -> int:
        """Requests started at or after `after` (monotonic) that streamed to the end."""
        return sum(1 for o in self.outcomes if o.ok and o.started >= after)

    async def wait_answered(self, count: int, after: float = 0.0, within: float = 30.0) -> None:
        """Until `count` requests started after `after` were answered in full."""
        deadline = time.monotonic() + within
        while self.answered(after) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.answered(after)} of {count} requests answered after {after:.1f}; "
                    f"failures: {self.failures(after)[:3]}"
                )
            await asyncio.sleep(0.05)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    c.write_config()
    try:
        yield c
    finally:
        c.stop_all()


async def start_two_nodes(c: Cluster) -> pb.StatusResponse:
    """Both nodes register before the deployment grows to 2, so it spreads over them."""
    c.replicas = 0
    c.write_config()
    c.start_controller()
    c.start_scheduler("n1", 0)
    c.start_scheduler("n2", 1)
    c.start_gateway()
    await c.wait_for("two nodes", lambda s: len([n for n in s.nodes if n.alive]) == 2)
    async with member_channel(c.controller) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        await stub.Scale(pb.ScaleRequest(deployment="echo", replicas=2), timeout=5)
    status = await c.wait_for("2 running replicas", lambda s: len(running(s)) == 2)
    await c.wait_gateway_ready()
    return status


async def test_killed_replica_is_restarted_and_others_keep_serving(cluster: Cluster) -> None:
    status = await start_two_nodes(cluster)
    assert {r.node_id for r in running(status)} == {"n1", "n2"}  # spread over both nodes
    victim = running(status)[0]
    load = Load(cluster.url)
    load.start()
    await load.wait_answered(10)
    killed_at = time.monotonic()
    os.kill(victim.status.pid, signal.SIGKILL)

    def restarted(s: pb.StatusResponse) -> bool:
        mine = [r for r in running(s) if r.status.replica_id == victim.status.replica_id]
        return len(running(s)) == 2 and bool(mine) and mine[0].status.restarts >= 1

    after = await cluster.wait_for("the replica restarted", restarted, within=30)
    await load.wait_answered(10, after=time.monotonic())  # served with both replicas back
    await load.stop()
    again = next(r for r in after.replicas if r.status.replica_id == victim.status.replica_id)
    assert again.status.pid != victim.status.pid and again.node_id == victim.node_id
    assert after.routing_version > status.routing_version
    # Streams cut by the kill may fail; every request sent after it is answered.
    late = load.failures(after=killed_at + 0.2)
    assert not late, f"{len(late)} failed after the kill: {late[:3]}"
    assert load.answered(after=killed_at) > 10


async def test_killed_scheduler_replicas_move_to_other_node(cluster: Cluster) -> None:
    status = await start_two_nodes(cluster)
    on_n1 = [r for r in running(status) if r.node_id == "n1"]
    assert len(on_n1) == 1
    load = Load(cluster.url)
    load.start()
    await load.wait_answered(5)
    cluster.procs["scheduler-n1"].kill()  # SIGKILL: no chance to stop its replicas itself

    def moved(s: pb.StatusResponse) -> bool:
        nodes = {n.node.node_id: n.alive for n in s.nodes}
        return not nodes["n1"] and [r.node_id for r in running(s)] == ["n2", "n2"]

    await cluster.wait_for("replicas moved to n2", moved, within=30)
    moved_at = time.monotonic()
    await asyncio.to_thread(wait_pid_gone, on_n1[0].status.pid, 10.0)
    assert not pid_alive(on_n1[0].status.pid), "the dead node's replica outlived its scheduler"
    await load.wait_answered(6, after=moved_at)
    await load.stop()
    assert not load.failures(after=moved_at), load.failures(after=moved_at)[:3]


async def test_controller_restart_under_load_fails_nothing(cluster: Cluster) -> None:
    status = await start_two_nodes(cluster)
    before = {r.status.replica_id: r.status.pid for r in running(status)}
    load = Load(cluster.url)
    load.start()
    await load.wait_answered(5)
    cluster.procs["controller"].kill()
    await load.wait_answered(10, after=time.monotonic())  # gateways carry on alone
    cluster.start_controller()
    after = await cluster.wait_for(
        "the restarted controller to see both replicas",
        lambda s: len(running(s)) == 2 and all(n.alive for n in s.nodes),
    )
    # Nothing is declared dead: heartbeats keep arriving past a whole dead-node window.
    window_end = time.time() + HEARTBEAT_S * DEAD_AFTER
    final = await cluster.wait_for(
        "heartbeats past the dead-node window",
        lambda s: all(n.last_heartbeat_unix > window_end for n in s.nodes),
    )
    assert all(n.alive for n in final.nodes)
    await load.stop()
    assert not load.failures(), load.failures()[:3]
    assert {r.status.replica_id: r.status.pid for r in running(final)} == before
    assert all(r.status.restarts == 0 for r in final.replicas)
    assert after.routing_version >= status.routing_version
    assert "restored 1 deployments, 2 nodes, 2 replicas" in cluster.procs["controller"].log()


async def mss_scale(c: Cluster, n: int) -> str:
    out = await asyncio.to_thread(run_mss, "scale", "echo", str(n), "--controller", c.controller)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_scale_up_and_down_under_load_fails_nothing(cluster: Cluster) -> None:
    cluster.replicas = 1
    cluster.write_config()
    cluster.start_controller()
    cluster.start_scheduler("n1", 0)
    cluster.start_gateway()
    await cluster.wait_for("1 running replica", lambda s: len(running(s)) == 1)
    await cluster.wait_gateway_ready()
    load = Load(cluster.url, clients=6)
    load.start()
    await load.wait_answered(10)
    assert "echo: target 3 replicas" in await mss_scale(cluster, 3)
    await cluster.wait_for("3 running replicas", lambda s: len(running(s)) == 3)
    await load.wait_answered(10, after=time.monotonic())
    assert "echo: target 1 replicas" in await mss_scale(cluster, 1)
    await cluster.wait_for(
        "scale-down to finish", lambda s: len(s.replicas) == 1 and len(running(s)) == 1
    )
    await load.wait_answered(10, after=time.monotonic())
    await load.stop()
    assert not load.failures(), load.failures()[:3]
    assert len(load.outcomes) > 30
    table = (await asyncio.to_thread(run_mss, "status", "--controller", cluster.controller)).stdout
    assert "n1" in table and "running" in table and "1/1" in table


async def test_invalid_config_is_refused_with_the_bad_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {"deployments": [{"name": "x", "engine": "turbo", "replicas": -2, "model": "fake"}]}
        )
    )
    for command in (["controller", "--state", str(tmp_path / "s.sqlite")], ["up"]):
        out = await asyncio.to_thread(run_mss, *command, "--config", str(bad))
        text = out.stdout + out.stderr
        assert out.returncode == 2, text
        assert "deployments.0.engine" in text and '"turbo"' in text, text
        assert "deployments.0.replicas" in text and "-2" in text, text


async def test_apply_config_checks_and_changes_deployments(cluster: Cluster) -> None:
    cluster.replicas = 1
    cluster.write_config()
    cluster.start_controller()
    cluster.start_scheduler("n1", 0)
    await cluster.wait_for("1 running replica", lambda s: len(running(s)) == 1)
    async with member_channel(cluster.controller) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ApplyConfig(
                pb.ApplyConfigRequest(config_text="deployments: [{replicas: x}]")
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert '"x"' in (err.value.details() or "")
        two = {
            "deployments": [
                {
                    "name": "echo",
                    "model": "fake",
                    "engine": "fake",
                    "replicas": 1,
                    "resources": {"cpus": 0.5, "memory_gib": 0.5},
                },
                {
                    "name": "other",
                    "model": "fake",
                    "engine": "fake",
                    "replicas": 1,
                    "resources": {"cpus": 0.5, "memory_gib": 0.5},
                    "routing": "round_robin",
                },
            ]
        }
        reply = await stub.ApplyConfig(pb.ApplyConfigRequest(config_text=yaml.safe_dump(two)))
        assert [d.name for d in reply.deployments] == ["echo", "other"]
        watch = stub.WatchRoutes(pb.WatchRoutesRequest(known_version=0, watcher_id="test"))
        deadline = time.monotonic() + 20
        async for table in watch:
            models = {m.model: len(m.routes) for m in table.models}
            if models == {"echo": 1, "other": 1} or time.monotonic() > deadline:
                break
        watch.cancel()
        assert models == {"echo": 1, "other": 1}


async def gateway_table_version(c: Cluster) -> float:
    async with httpx.AsyncClient(timeout=5.0) as http:
        text = (await http.get(f"{c.url}/metrics")).text
    for line in text.splitlines():
        if line.startswith("mss_gateway_routing_table_version "):
            return float(line.split()[1])
    raise AssertionError("gateway exports no routing table version")


async def wait_gateway_version(c: Cluster, version: int, within: float = 20.0) -> None:
    """Until the gateway holds routing table `version`; versions only grow, so never past it."""
    deadline = time.monotonic() + within
    while (held := await gateway_table_version(c)) < version:
        if time.monotonic() > deadline:
            raise AssertionError(f"gateway holds table v{held:g}, not v{version}\n{c.logs()}")
        await asyncio.sleep(0.05)
    assert held == version, f"gateway holds v{held:g}, expected v{version}"


async def test_controller_that_lost_its_state_adopts_running_replicas(cluster: Cluster) -> None:
    await start_two_nodes(cluster)
    # Churn, so the gateway holds a version well past what a fresh controller reaches
    # below (replicas that turn ready in the same step share a version: loop until).
    for _ in range(4):
        await mss_scale(cluster, 3)
        await cluster.wait_for("3 running replicas", lambda s: len(running(s)) == 3)
        await mss_scale(cluster, 2)
        status = await cluster.wait_for("2 replicas", lambda s: len(s.replicas) == 2)
        await wait_gateway_version(cluster, status.routing_version)
        if status.routing_version >= 5:
            break
    before = {r.status.replica_id: r.status.pid for r in running(status)}
    load = Load(cluster.url)
    load.start()
    await load.wait_answered(5)
    held = await gateway_table_version(cluster)
    assert held >= 5  # a fresh controller alone would not get past v4 below
    cluster.procs["controller"].kill()
    for path in cluster.tmp.glob("controller.sqlite*"):
        path.unlink()
    cluster.replicas = 2  # the file now asks for what runs
    cluster.write_config()
    cluster.start_controller()
    adopted = await cluster.wait_for(
        "the replicas to be adopted", lambda s: len(running(s)) == 2 and len(s.replicas) == 2
    )
    assert {r.status.replica_id: r.status.pid for r in running(adopted)} == before
    # The fresh controller's versions continue past what the gateway holds, so the
    # gateway follows it: a scale-down reaches the gateway's table.
    assert (await mss_scale(cluster, 1)).startswith("echo: target 1")
    final = await cluster.wait_for("scale-down", lambda s: len(s.replicas) == 1)
    assert final.routing_version > held
    await wait_gateway_version(cluster, final.routing_version)
    await load.stop()
    assert not load.failures(), load.failures()[:3]
