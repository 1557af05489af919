"""The real `Launcher`: replica child processes, free ports and gRPC Health calls.

Replicas run as `python -m mss.cli replica ...` in their own session (so a
Ctrl-C on the terminal reaches the scheduler, which stops them in order) with
the parent-death signal set (`mss.processes.die_with_parent`): if the
scheduler dies, even by SIGKILL, the kernel tells each replica to drain and
exit, so no orphan outlives its node. The death signal fires when the thread
that forked the child ends, so processes are always spawned from the event
loop's thread, never a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import grpc

from mss import rpc_auth
from mss.processes import EXIT_REASON_ENV, die_with_parent, port_is_free, read_exit_reason
from mss.rpc import UNARY_CHANNEL_OPTIONS
from mss.security import Credentials
from protos import replica_pb2, replica_pb2_grpc
from scheduler.supervisor import Health, LaunchSpec

log = logging.getLogger(__name__)


class ReplicaProcess:
    """A replica child; `kill` takes its whole process group (engine workers too)."""

    def __init__(self, popen: subprocess.Popen[bytes], reason_path: str) -> None:
        self._popen = popen
        self._reason_path = reason_path

    @property
    def pid(self) -> int:
        return self._popen.pid

    def poll(self) -> int | None:
        return self._popen.poll()

    def exit_reason(self) -> str:
        return read_exit_reason(self._reason_path)

    def terminate(self) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        try:
            os.killpg(self._popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already


class ProcessLauncher:
    """Starts replica processes on ports from the node's ranges and calls their Health."""

    def __init__(
        self,
        bind_host: str,
        advertise_host: str,
        grpc_ports: range,
        metrics_ports: range,
        creds: Credentials,
        log_format: str = "text",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.bind_host = bind_host
        self.advertise_host = advertise_host
        self.ports = {"grpc": grpc_ports, "metrics": metrics_ports}
        self.log_format = log_format
        self.creds = creds
        self.extra_env = extra_env or {}
        self._channels: dict[str, tuple[int, grpc.aio.Channel]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._reasons = tempfile.mkdtemp(prefix="mss-replica-exits-")
        """Where each replica may say why it exited (`mss.processes.write_exit_reason`)."""

    def command(self, spec: LaunchSpec) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mss.cli",
            "replica",
            "--deployment-json",
            spec.deployment_json,
            "--replica-id",
            spec.replica_id,
            "--host",
            self.bind_host,
            "--port",
            str(spec.port),
            "--metrics-port",
            str(spec.metrics_port),
            "--drain-timeout",
            str(spec.drain_timeout_s),
            "--log-format",
            self.log_format,
            *self.creds.child_arguments(),
        ]

    def spawn(self, spec: LaunchSpec) -> ReplicaProcess:
        # The child inherits this process's environment, GRPC_ENABLE_FORK_SUPPORT
        # set by `scheduler.main.run` included (replicas fork their engine's
        # processes while their gRPC server runs).
        env = dict(os.environ)
        env.update(self.extra_env)
        env["MSS_REPLICA_ID"] = spec.replica_id
        reason_path = os.path.join(self._reasons, f"{spec.replica_id}.exit")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(reason_path)  # a previous run's
        env[EXIT_REASON_ENV] = reason_path
        if spec.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in spec.gpu_ids)
        popen = subprocess.Popen(
            self.command(spec),
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        return ReplicaProcess(popen, reason_path)

    def free_port(self, kind: str, taken: set[int]) -> int:
        for port in self.ports[kind]:
            if port not in taken and port_is_free(self.bind_host, port):
                return port
        raise OSError(
            f"no free {kind} port in {self.ports[kind].start}-{self.ports[kind].stop - 1}"
        )

    def address(self, port: int) -> str:
        return f"{self.advertise_host}:{port}"

    async def health(self, replica_id: str, port: int) -> Health:
        cached = self._channels.get(replica_id)
        if cached is None or cached[0] != port:
            if cached is not None:
                await cached[1].close()
            target = f"{'127.0.0.1' if self.bind_host == '0.0.0.0' else self.bind_host}:{port}"
            cached = (port, rpc_auth.channel(target, self.creds, "replica", UNARY_CHANNEL_OPTIONS))
            self._channels[replica_id] = cached
        stub = replica_pb2_grpc.ReplicaStub(cached[1])
        reply: replica_pb2.HealthResponse = await stub.Health(
            replica_pb2.HealthRequest(), timeout=2.0, metadata=self.creds.metadata()
        )
        return Health(
            ready=reply.ready and not reply.draining,
            running=reply.load.running,
            waiting=reply.load.waiting,
            kv_cache_usage=reply.load.kv_cache_usage,
        )

    def forget(self, replica_id: str) -> None:
        cached = self._channels.pop(replica_id, None)
        if cached is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(cached[1].close())
        except RuntimeError:  # no loop: the channel is closed when collected
            return
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for _, channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        shutil.rmtree(self._reasons, ignore_errors=True)
