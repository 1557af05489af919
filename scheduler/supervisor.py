"""Supervision of the replica processes on one node.

Each replica is a child process (`mss replica ...`) in its own process group,
started with a parent-death signal so it cannot outlive the scheduler even
when the scheduler is killed with SIGKILL. A replica counts as RUNNING only
while its process runs and its gRPC Health answers ready. A crash is followed
by a restart after an exponential backoff (reset once the replica has run
steadily); a stop sends SIGTERM, which makes the replica drain, and kills the
whole process group if it is still there after the deadline.

All transitions are non-blocking and happen in `update()`; process creation,
signals and Health calls sit behind `Launcher`, so unit tests step the
supervisor with a fake launcher and a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mss.config import Deployment
from mss.replica_states import LIVE, RUNNING, STARTING, STOPPED, STOPPING, UNHEALTHY, state_name
from protos import controller_pb2 as pb

log = logging.getLogger(__name__)

NODE_STATES = (*LIVE, STOPPING, STOPPED)
"""Every state a replica on this node can be in; each is exported, even when at zero."""


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything a launcher needs to start one replica process."""

    replica_id: str
    deployment_json: str
    port: int
    metrics_port: int
    drain_timeout_s: float
    gpu_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Health:
    """A replica's answer to Health: ready, and its engine's load for the controller."""

    ready: bool
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


class ProcessHandle(Protocol):
    """A started replica process, as the launcher hands it back."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None:
        """Exit code once the process has ended, else None."""

    def exit_reason(self) -> str:
        """Why the process said it exited (one line), or empty when it said nothing."""

    def terminate(self) -> None:
        """Ask the replica to drain and exit (SIGTERM)."""

    def kill(self) -> None:
        """Kill the replica and everything in its process group (SIGKILL)."""


class Launcher(Protocol):
    """The supervisor's only I/O: processes, ports and Health calls."""

    def spawn(self, spec: LaunchSpec) -> ProcessHandle: ...

    def free_port(self, kind: str, taken: set[int]) -> int:
        """A port for `kind` ('grpc' or 'metrics') that is free now and not in `taken`."""

    def address(self, port: int) -> str:
        """host:port at which gateways reach a replica listening on `port`."""

    async def health(self, replica_id: str, port: int) -> Health:
        """Call the replica's Health; raises on any failure."""

    def forget(self, replica_id: str) -> None:
        """Drop what is cached for a replica whose process has ended (its channel)."""


@dataclass(slots=True)
class SupervisorSettings:
    """Timings of the state machines; tests shorten them."""

    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    backoff_reset_s: float = 30.0
    """A replica RUNNING this long since its start resets the backoff."""
    start_timeout_s: float = 900.0
    """A replica not ready this long after its start is killed and started again.
    Generous: the bundled model's first start converts it from GGUF."""
    unhealthy_after: int = 3
    """Failed Health calls in a row that turn a RUNNING replica UNHEALTHY."""
    unhealthy_restart_s: float = 60.0
    """An UNHEALTHY replica whose process still runs is killed after this long."""
    kill_grace_s: float = 10.0
    """Extra time past the drain timeout before a stopping replica is killed."""


@dataclass(slots=True)
class Replica:
    """One assigned replica: what the controller asked for and where its process stands."""

    replica_id: str
    deployment: str
    deployment_json: str
    drain_timeout_s: float
    cpus: float
    gpus: int
    state: int = STARTING
    keep: bool = True
    proc: ProcessHandle | None = None
    port: int = 0
    metrics_port: int = 0
    gpu_ids: tuple[int, ...] = ()
    restarts: int = 0
    backoff_s: float = 0.0
    next_start: float = 0.0
    started_at: float = 0.0
    healthy_since: float | None = None
    unhealthy_since: float | None = None
    failures: int = 0
    stop_deadline: float = 0.0
    killed: bool = False
    health: Health = field(default_factory=lambda: Health(ready=False))
    message: str = ""
    reported_stopped: bool = False


class Supervisor:
    """The replicas of one node and their state machines."""

    def __init__(
        self,
        launcher: Launcher,
        gpus: int = 0,
        settings: SupervisorSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.launcher = launcher
        self.settings = settings or SupervisorSettings()
        self.clock = clock
        self.on_change = on_change or (lambda: None)
        self.replicas: dict[str, Replica] = {}
        self.free_gpus: set[int] = set(range(gpus))
        self.restart_events: dict[str, int] = {}

    # ----- commands --------------------------------------------------------------------

    def ensure(self, replica_id: str, deployment_json: str, drain_timeout_s: float) -> None:
        """Keep a replica running; it starts at the next `update()` if it is new."""
        existing = self.replicas.get(replica_id)
        if existing is not None:
            if existing.state != STOPPED:
                existing.drain_timeout_s = drain_timeout_s
                return
            self._forget(existing)
        spec = Deployment.model_validate_json(deployment_json)
        self.replicas[replica_id] = Replica(
            replica_id=replica_id,
            deployment=spec.name,
            deployment_json=deployment_json,
            drain_timeout_s=drain_timeout_s,
            cpus=spec.resources.cpus,
            gpus=spec.resources.gpus,
            backoff_s=self.settings.initial_backoff_s,
        )
        log.info("replica %s of %s assigned", replica_id, spec.name)

    def stop(self, replica_id: str, drain_timeout_s: float | None = None) -> None:
        """Drain and stop a replica; a no-op for one already stopping or unknown."""
        rep = self.replicas.get(replica_id)
        if rep is None or not rep.keep:
            return
        rep.keep = False
        if drain_timeout_s is not None:
            rep.drain_timeout_s = drain_timeout_s
        now = self.clock()
        if rep.proc is None or rep.proc.poll() is not None:
            self._set(rep, STOPPED, "stopped before it ran")
            self._release(rep)
            return
        log.info(
            "stopping replica %s (pid %d), drain up to %.0f s",
            replica_id,
            rep.proc.pid,
            rep.drain_timeout_s,
        )
        rep.proc.terminate()
        rep.stop_deadline = now + rep.drain_timeout_s + self.settings.kill_grace_s
        self._set(rep, STOPPING, "draining")

    def stop_all(self) -> None:
        """Drain and stop every replica (the scheduler is shutting down)."""
        for replica_id in list(self.replicas):
            self.stop(replica_id)

    def all_stopped(self) -> bool:
        """Whether every replica's process has exited."""
        return all(rep.state == STOPPED for rep in self.replicas.values())

    def forget_stopped(self, keep_ids: set[str]) -> None:
        """Drop stopped replicas the controller no longer lists, once they were reported."""
        for rep in list(self.replicas.values()):
            if rep.state == STOPPED and rep.reported_stopped and rep.replica_id not in keep_ids:
                self._forget(rep)

    # ----- the step ----------------------------------------------------------------------

    async def update(self) -> None:
        """Advance every replica: start due ones, reap exits, probe health, enforce deadlines."""
        now = self.clock()
        probes: list[Replica] = []
        for rep in list(self.replicas.values()):
            try:
                if self._step(rep, now):
                    probes.append(rep)
            except Exception:
                # One replica's broken step (logged with its traceback) must
                # not stop the supervision of the others; retried next update.
                log.exception("supervising replica %s failed; retrying", rep.replica_id)
        if probes:
            results = await asyncio.gather(
                *(self.launcher.health(rep.replica_id, rep.port) for rep in probes),
                return_exceptions=True,
            )
            now = self.clock()
            for rep, result in zip(probes, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                self._judge(rep, result if isinstance(result, Health) else None, now, result)

    def _step(self, rep: Replica, now: float) -> bool:
        """Process-level transitions; True when the replica's Health should be called."""
        if not rep.keep:
            if rep.state == STOPPING and rep.proc is not None:
                code = rep.proc.poll()
                if code is not None:
                    log.info("replica %s exited with code %s", rep.replica_id, code)
                    rep.proc.kill()  # leftovers in its process group, if any
                    self._release(rep)
                    self._set(rep, STOPPED, f"exited with code {code}")
                elif now >= rep.stop_deadline and not rep.killed:
                    log.warning(
                        "replica %s still running after its drain deadline; killing", rep.replica_id
                    )
                    rep.proc.kill()
                    rep.killed = True
            return False
        if rep.proc is None:
            if now >= rep.next_start:
                self._start(rep, now)
            return False
        code = rep.proc.poll()
        if code is not None:
            reason = rep.proc.exit_reason()
            self._crashed(rep, now, f"exited with code {code}" + (f" ({reason})" if reason else ""))
            return False
        if rep.state == STARTING and now - rep.started_at > self.settings.start_timeout_s:
            rep.proc.kill()
            self._crashed(rep, now, f"not ready after {self.settings.start_timeout_s:.0f} s")
            return False
        if (
            rep.state == UNHEALTHY
            and rep.unhealthy_since is not None
            and now - rep.unhealthy_since > self.settings.unhealthy_restart_s
        ):
            rep.proc.kill()
            self._crashed(rep, now, f"unhealthy for {self.settings.unhealthy_restart_s:.0f} s")
            return False
        return True

    def _start(self, rep: Replica, now: float) -> None:
        if rep.gpus > len(self.free_gpus):
            rep.message = f"waiting for {rep.gpus} free GPUs"
            return
        taken = {r.port for r in self.replicas.values() if r.proc is not None}
        taken |= {r.metrics_port for r in self.replicas.values() if r.proc is not None}
        rep.port = self.launcher.free_port("grpc", taken)
        rep.metrics_port = self.launcher.free_port("metrics", taken | {rep.port})
        rep.gpu_ids = tuple(sorted(self.free_gpus)[: rep.gpus])
        self.free_gpus -= set(rep.gpu_ids)
        spec = LaunchSpec(
            replica_id=rep.replica_id,
            deployment_json=rep.deployment_json,
            port=rep.port,
            metrics_port=rep.metrics_port,
            drain_timeout_s=rep.drain_timeout_s,
            gpu_ids=rep.gpu_ids,
        )
        try:
            rep.proc = self.launcher.spawn(spec)
        except OSError as exc:
            self._release(rep)
            self._crashed(rep, now, f"cannot start: {exc}")
            return
        rep.started_at = now
        rep.healthy_since = None
        rep.unhealthy_since = None
        rep.failures = 0
        rep.killed = False
        log.info("started replica %s (pid %d) on port %d", rep.replica_id, rep.proc.pid, rep.port)
        self._set(rep, STARTING, "loading")

    def _crashed(self, rep: Replica, now: float, why: str) -> None:
        if rep.proc is not None:
            rep.proc.kill()  # whatever the replica left in its process group (engine workers)
        self._release(rep)
        rep.proc = None
        rep.next_start = now + rep.backoff_s
        log.warning("replica %s %s; restarting in %.1f s", rep.replica_id, why, rep.backoff_s)
        rep.restarts += 1
        self.restart_events[rep.deployment] = self.restart_events.get(rep.deployment, 0) + 1
        rep.backoff_s = min(rep.backoff_s * 2, self.settings.max_backoff_s)
        self._set(rep, UNHEALTHY, f"{why}; restart {rep.restarts} in {rep.next_start - now:.1f} s")

    def _judge(self, rep: Replica, health: Health | None, now: float, error: object) -> None:
        if not rep.keep or rep.proc is None:
            return
        if health is not None and health.ready:
            rep.health = health
            rep.failures = 0
            rep.unhealthy_since = None
            if rep.healthy_since is None:
                rep.healthy_since = now
            if now - rep.started_at >= self.settings.backoff_reset_s:
                rep.backoff_s = self.settings.initial_backoff_s
            self._set(rep, RUNNING, "")
            return
        if rep.state == STARTING:
            return  # still loading: Health answers not ready or the server is not up yet
        rep.failures += 1
        if rep.failures >= self.settings.unhealthy_after and rep.state == RUNNING:
            rep.unhealthy_since = now
            rep.healthy_since = None
            reason = "health: not ready" if health is not None else f"health failed: {error}"
            self._set(rep, UNHEALTHY, reason[:200])

    def _set(self, rep: Replica, state: int, message: str) -> None:
        rep.message = message
        if rep.state != state:
            log.info(
                "replica %s: %s -> %s%s",
                rep.replica_id,
                state_name(rep.state),
                state_name(state),
                f" ({message})" if message else "",
            )
            rep.state = state
            self.on_change()

    def _release(self, rep: Replica) -> None:
        self.free_gpus |= set(rep.gpu_ids)
        rep.gpu_ids = ()
        self.launcher.forget(rep.replica_id)

    def _forget(self, rep: Replica) -> None:
        self._release(rep)
        del self.replicas[rep.replica_id]

    # ----- reports -----------------------------------------------------------------------

    def statuses(self) -> list[pb.ReplicaStatus]:
        """What the next heartbeat reports; a STOPPED replica counts as reported from here on."""
        out = []
        for rep in sorted(self.replicas.values(), key=lambda r: r.replica_id):
            if rep.state == STOPPED:
                rep.reported_stopped = True
            alive = rep.proc is not None and rep.state != STOPPED
            out.append(
                pb.ReplicaStatus(
                    replica_id=rep.replica_id,
                    deployment=rep.deployment,
                    state=rep.state,  # type: ignore[arg-type]
                    address=self.launcher.address(rep.port) if alive else "",
                    metrics_address=self.launcher.address(rep.metrics_port) if alive else "",
                    pid=rep.proc.pid if alive and rep.proc is not None else 0,
                    restarts=rep.restarts,
                    load=pb.ReplicaLoad(
                        running=rep.health.running,
                        waiting=rep.health.waiting,
                        kv_cache_usage=rep.health.kv_cache_usage,
                    ),
                    message=rep.message,
                )
            )
        return out

    def state_counts(self) -> dict[str, int]:
        """Replicas per state name, every state present, for the `mss_scheduler_replicas` gauge."""
        counts = {state_name(state): 0 for state in NODE_STATES}
        for rep in self.replicas.values():
            counts[state_name(rep.state)] += 1
        return counts
