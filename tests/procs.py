"""Start real processes of the system on free loopback ports, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protos import replica_pb2, replica_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_env() -> dict[str, str]:
    """The environment a replica needs on a small CPU machine, offline."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class Proc:
    """A child process with its log file; `stop()` ends it and its group."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(timeout=5, sig=signal.SIGKILL)


def spawn(args: list[str], name: str, env: dict[str, str] | None = None) -> Proc:
    """Start `mss ARGS...` in its own process group, output to a temp log file."""
    fd, path = tempfile.mkstemp(prefix=f"mss-{name}-", suffix=".log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mss.cli", *args],
        stdout=fd,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env or engine_env(),
        cwd=ROOT,
        start_new_session=True,
    )
    os.close(fd)
    return Proc(proc=proc, log_path=Path(path))


def health(address: str, timeout: float = 2.0) -> replica_pb2.HealthResponse:
    with grpc.insecure_channel(address) as channel:
        stub = replica_pb2_grpc.ReplicaStub(channel)
        return stub.Health(replica_pb2.HealthRequest(), timeout=timeout)


def wait_ready(proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"replica exited with {proc.proc.returncode}:\n{proc.log()[-3000:]}")
        try:
            if health(proc.address, timeout=1.0).ready:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"replica not ready after {timeout:.0f} s:\n{proc.log()[-3000:]}")


def start_replica(
    engine: str = "fake",
    name: str = "smollm2",
    token_interval_ms: float = 10.0,
    max_in_flight: int | None = None,
    extra_args: list[str] | None = None,
    ready_timeout: float | None = None,
    wait: bool = True,
) -> Proc:
    """Start `mss replica` on a free port; by default wait until Health says ready."""
    port, metrics_port = free_port(), free_port()
    args = [
        "replica",
        "--engine",
        engine,
        "--name",
        name,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--token-interval-ms",
        str(token_interval_ms),
        "--replica-id",
        f"{name}-{port}",
    ]
    if max_in_flight:
        args += ["--max-in-flight", str(max_in_flight)]
    args += extra_args or []
    proc = spawn(args, f"replica-{port}")
    proc.address = f"127.0.0.1:{port}"
    proc.extra["metrics_port"] = metrics_port
    if wait:
        wait_ready(proc, ready_timeout or (300.0 if engine == "vllm" else 30.0))
    return proc
