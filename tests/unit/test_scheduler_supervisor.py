"""The scheduler's replica state machines, stepped with a fake launcher and clock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from mss.config import Deployment
from mss.processes import EXIT_REASON_ENV, read_exit_reason, write_exit_reason
from mss.security import Credentials
from protos import controller_pb2 as pb
from scheduler.agent import NodeAgent
from scheduler.supervisor import Health, LaunchSpec, Supervisor, SupervisorSettings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: int | None = None
        self.signals: list[str] = []
        self.reason = ""

    def poll(self) -> int | None:
        return self.code

    def exit_reason(self) -> str:
        return self.reason

    def terminate(self) -> None:
        self.signals.append("TERM")

    def kill(self) -> None:
        self.signals.append("KILL")
        self.code = -9


class FakeLauncher:
    def __init__(self) -> None:
        self.spawned: list[tuple[LaunchSpec, FakeProcess]] = []
        self.ready: set[str] = set()
        self.down: set[str] = set()

    def spawn(self, spec: LaunchSpec) -> FakeProcess:
        proc = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((spec, proc))
        return proc

    def free_port(self, kind: str, taken: set[int]) -> int:
        base = 50100 if kind == "grpc" else 9200
        return next(p for p in range(base, base + 100) if p not in taken)

    def address(self, port: int) -> str:
        return f"10.0.0.1:{port}"

    async def health(self, replica_id: str, port: int) -> Health:
        if replica_id in self.down:
            raise ConnectionError("refused")
        return Health(ready=replica_id in self.ready, running=2, waiting=1, kv_cache_usage=0.5)

    def forget(self, replica_id: str) -> None:
        pass

    def proc(self, replica_id: str) -> FakeProcess:
        return [p for s, p in self.spawned if s.replica_id == replica_id][-1]


def spec_json(gpus: int = 0) -> str:
    return Deployment.model_validate(
        {"name": "echo", "model": "fake", "engine": "fake", "resources": {"gpus": gpus}}
    ).model_dump_json()


def make() -> tuple[Supervisor, FakeLauncher, Clock, list[int]]:
    launcher, clock = FakeLauncher(), Clock()
    changes: list[int] = []
    sup = Supervisor(
        launcher,  # type: ignore[arg-type]
        gpus=2,
        settings=SupervisorSettings(initial_backoff_s=1, max_backoff_s=4, backoff_reset_s=30),
        clock=clock,
        on_change=lambda: changes.append(1),
    )
    return sup, launcher, clock, changes


def state_of(sup: Supervisor, replica_id: str) -> int:
    return next(s.state for s in sup.statuses() if s.replica_id == replica_id)


async def test_starts_and_runs_only_when_health_is_ready() -> None:
    sup, launcher, _, changes = make()
    sup.ensure("r1", spec_json(), 5.0)
    await sup.update()
    spec, _ = launcher.spawned[0]
    assert spec.replica_id == "r1" and spec.port == 50100 and spec.drain_timeout_s == 5.0
    assert state_of(sup, "r1") == pb.STARTING
    await sup.update()
    assert state_of(sup, "r1") == pb.STARTING  # loading: Health answers not ready
    launcher.ready.add("r1")
    await sup.update()
    status = sup.statuses()[0]
    assert status.state == pb.RUNNING and status.address == "10.0.0.1:50100"
    assert status.load.running == 2 and status.pid == 1000
    assert changes  # the agent is woken to report at once


async def test_crash_restarts_with_exponential_backoff() -> None:
    sup, launcher, clock, _ = make()
    sup.ensure("r1", spec_json(), 5.0)
    launcher.ready.add("r1")
    await sup.update()
    await sup.update()
    waits = []
    for expected_restarts in (1, 2, 3, 4):
        launcher.proc("r1").code = 1  # crash
        await sup.update()
        status = sup.statuses()[0]
        assert status.state == pb.UNHEALTHY and status.restarts == expected_restarts
        assert status.address == ""
        started = len(launcher.spawned)
        crashed_at = clock.now
        while len(launcher.spawned) == started:
            clock.now += 0.5
            await sup.update()
        waits.append(clock.now - crashed_at)
        await sup.update()
        assert state_of(sup, "r1") == pb.RUNNING
    assert waits == [1.0, 2.0, 4.0, 4.0]  # doubles, capped
    assert sup.restart_events == {"echo": 4}


async def test_a_replica_that_cannot_start_reports_why() -> None:
    sup, launcher, _, _ = make()
    sup.ensure("r1", spec_json(), 5.0)
    await sup.update()
    launcher.proc("r1").code = 1
    launcher.proc("r1").reason = "cannot load model: no config.json"
    await sup.update()
    status = sup.statuses()[0]
    assert status.state == pb.UNHEALTHY
    assert status.message.startswith(
        "exited with code 1 (cannot load model: no config.json); restart 1 in 1.0 s"
    )


def test_exit_reason_travels_through_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r1.exit"
    assert read_exit_reason(str(path)) == ""
    monkeypatch.setenv(EXIT_REASON_ENV, str(path))
    write_exit_reason("engine failed to start:\nRuntimeError('x')")
    assert read_exit_reason(str(path)) == "engine failed to start: RuntimeError('x')"


async def test_running_replica_failing_health_turns_unhealthy_then_recovers() -> None:
    sup, launcher, _, _ = make()
    sup.ensure("r1", spec_json(), 5.0)
    launcher.ready.add("r1")
    await sup.update()
    await sup.update()
    launcher.down.add("r1")
    for _ in range(3):
        await sup.update()
    assert state_of(sup, "r1") == pb.UNHEALTHY
    launcher.down.clear()
    await sup.update()
    assert state_of(sup, "r1") == pb.RUNNING
    assert len(launcher.spawned) == 1


async def test_stop_drains_then_kills_after_deadline() -> None:
    sup, launcher, clock, _ = make()
    sup.ensure("r1", spec_json(), 5.0)
    sup.ensure("r2", spec_json(), 5.0)
    await sup.update()
    sup.stop("r1")
    sup.stop("r2")
    assert launcher.proc("r1").signals == ["TERM"]
    assert state_of(sup, "r1") == pb.STOPPING
    launcher.proc("r1").code = 0  # drained and exited
    clock.now += 1
    await sup.update()
    assert state_of(sup, "r1") == pb.STOPPED
    clock.now += 20  # r2 ignores SIGTERM past drain + grace
    await sup.update()
    assert launcher.proc("r2").signals == ["TERM", "KILL"]
    await sup.update()
    assert sup.all_stopped()
    sup.forget_stopped(set())
    assert sup.replicas  # not reported yet: kept once more for the controller
    sup.statuses()
    sup.forget_stopped(set())
    assert not sup.replicas


async def test_gpus_are_handed_out_and_given_back() -> None:
    sup, launcher, _, _ = make()
    sup.ensure("a", spec_json(gpus=1), 1.0)
    sup.ensure("b", spec_json(gpus=1), 1.0)
    sup.ensure("c", spec_json(gpus=1), 1.0)
    await sup.update()
    ids = sorted(spec.gpu_ids for spec, _ in launcher.spawned)
    assert ids == [(0,), (1,)]
    waiting = next(s.message for s in sup.statuses() if s.replica_id == "c")
    assert "waiting for 1 free GPUs" in waiting
    first = launcher.spawned[0][0].replica_id
    sup.stop(first)
    launcher.proc(first).code = 0
    await sup.update()
    await sup.update()
    assert len(launcher.spawned) == 3
    assert launcher.spawned[2][0].gpu_ids == launcher.spawned[0][0].gpu_ids


async def test_agent_applies_assignments() -> None:
    sup, launcher, _, _ = make()
    agent = NodeAgent("127.0.0.1:1", pb.NodeInfo(node_id="n1"), sup, Credentials("scheduler"))
    try:
        keep = pb.ReplicaAssignment(
            replica_id="r1", deployment="echo", deployment_json=spec_json(), keep=True
        )
        other = pb.ReplicaAssignment(
            replica_id="r2", deployment="echo", deployment_json=spec_json(), keep=True
        )
        agent.apply([keep, other])
        await sup.update()
        assert len(launcher.spawned) == 2
        drop = pb.ReplicaAssignment(replica_id="r2", deployment="echo", keep=False)
        agent.apply([keep, drop])
        assert launcher.proc("r2").signals == ["TERM"]
        agent.apply([])  # the controller no longer wants anything here
        assert launcher.proc("r1").signals == ["TERM"]
    finally:
        await agent.close()


async def test_agent_keeps_replicas_when_controller_is_down() -> None:
    sup, launcher, _, _ = make()
    agent = NodeAgent(
        "127.0.0.1:1", pb.NodeInfo(node_id="n1"), sup, Credentials("scheduler"), rpc_timeout_s=0.5
    )
    try:
        sup.ensure("r1", spec_json(), 1.0)
        await sup.update()
        try:
            await agent.exchange()
            raise AssertionError("expected the controller to be unreachable")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert launcher.proc("r1").signals == []
    finally:
        await agent.close()


async def test_state_counts_name_every_node_state_even_at_zero() -> None:
    sup, _, _, _ = make()
    sup.ensure("r1", spec_json(), 1.0)
    await sup.update()
    assert sup.state_counts() == {
        "starting": 1,
        "running": 0,
        "unhealthy": 0,
        "stopping": 0,
        "stopped": 0,
    }


def test_only_the_entry_point_sets_grpc_fork_support_before_grpc_is_imported() -> None:
    # gRPC reads GRPC_ENABLE_FORK_SUPPORT once, when first imported: `run` can
    # set it only if importing the scheduler's entry point does not import gRPC,
    # and importing the scheduler's modules must leave the environment alone.
    code = (
        "import os, sys\n"
        "import scheduler.main\n"
        "assert 'grpc' not in sys.modules, 'scheduler.main imports grpc'\n"
        "import scheduler.agent, scheduler.launcher\n"
        "assert 'GRPC_ENABLE_FORK_SUPPORT' not in os.environ\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
