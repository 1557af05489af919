"""`mss up`: the whole system on this machine, in one command.

Starts `mss controller`, one `mss scheduler` and `mss gateway --controller`
as child processes (their output interleaved on this terminal, each line
prefixed with its role; replica output comes through the scheduler), waits
until every deployment has a running replica and the gateway answers
GET /ready, then prints a curl to try. Ctrl-C or SIGTERM stops the gateway
first, then the scheduler (which drains and stops the replicas), then the
controller.

Each run starts from a fresh controller state file under the cache
(`<cache>/up/controller.sqlite`): the replicas of a previous run died with it,
so there is nothing to adopt. Run the roles separately (`mss controller`...)
for state that outlives the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from mss import security
from mss.config import ClusterConfig, ConfigError, cache_dir, load_config, with_overrides
from mss.processes import die_with_parent, port_is_free
from mss.replica_states import RUNNING, state_name
from mss.rpc import UNARY_CHANNEL_OPTIONS
from mss.rpc_auth import channel
from mss.security import Credentials, SecurityError
from protos import controller_pb2 as pb
from protos import controller_pb2_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="deployments file (default: one bundled smollm2 replica)")
    parser.add_argument("--port", type=int, help="gateway HTTP port (default from config: 8000)")
    parser.add_argument("--controller-port", type=int, help="controller gRPC port (default 50051)")
    parser.add_argument("--scheduler-metrics-port", type=int, default=9102, help="0 for none")
    parser.add_argument("--replica-ports", default="50100-50199", help="gRPC ports for replicas")
    parser.add_argument("--replica-metrics-ports", default="9200-9299")
    parser.add_argument("--node-id", default=socket.gethostname())
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    security.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        config = config.model_copy(
            update={
                "gateway": with_overrides(config.gateway, "command line", port=args.port),
                "controller": with_overrides(
                    config.controller, "command line", port=args.controller_port
                ),
                "security": security.settings_from(args, config.security),
            }
        )
        # The cluster token is made here, before any child could race to make it.
        creds = security.load_credentials(config.security, "admin")
    except (ConfigError, SecurityError) as exc:
        sys.stderr.write(f"mss up: {exc}\n")
        return 2
    return asyncio.run(Up(args, config, creds).main())


def say(text: str) -> None:
    sys.stdout.write(f"{'up':<10} | {text}\n")
    sys.stdout.flush()


@dataclass
class Child:
    name: str
    argv: list[str]
    stop_timeout_s: float
    proc: asyncio.subprocess.Process | None = None
    pump: asyncio.Task[None] | None = None
    expected_exit: bool = False

    async def start(self, env: dict[str, str]) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches `mss up` only; it stops children in order
            preexec_fn=die_with_parent,
        )
        self.pump = asyncio.create_task(self._pump(), name=f"pump-{self.name}")

    async def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        prefix = f"{self.name:<10} | ".encode()
        while line := await self.proc.stdout.readline():
            sys.stdout.buffer.write(prefix + line)
            sys.stdout.flush()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.expected_exit = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), self.stop_timeout_s)
        except TimeoutError:
            say(f"{self.name} did not stop within {self.stop_timeout_s:.0f} s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        if self.pump is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.pump, 2.0)


class Up:
    def __init__(self, args: argparse.Namespace, config: ClusterConfig, creds: Credentials) -> None:
        self.args = args
        self.config = config
        self.creds = creds
        self.children: list[Child] = []
        self.stop = asyncio.Event()
        ctl = config.controller
        self.controller_address = f"{ctl.host}:{ctl.port}"
        gw = config.gateway
        scheme = "https" if config.security.https_cert_file else "http"
        host = "127.0.0.1" if gw.host == "0.0.0.0" else gw.host
        self.gateway_url = f"{scheme}://{host}:{gw.port}"

    def _prepare_files(self) -> tuple[Path, Path]:
        run_dir = cache_dir() / "up"
        run_dir.mkdir(parents=True, exist_ok=True)
        state = run_dir / "controller.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{state}{suffix}").unlink(missing_ok=True)
        config_path = run_dir / "config.json"
        config_path.write_text(json.dumps(self.config.model_dump(mode="json"), indent=2))
        return state, config_path

    def _children(self, state: Path, config_path: Path) -> list[Child]:
        py = [sys.executable, "-m", "mss.cli"]
        ctl, gw = self.config.controller, self.config.gateway
        fmt = ["--log-format", self.args.log_format]
        drain = ctl.drain_timeout_s
        return [
            Child(
                "controller",
                [*py, "controller", "--config", str(config_path), "--state", str(state), *fmt],
                stop_timeout_s=15,
            ),
            Child(
                "scheduler",
                [
                    *py,
                    "scheduler",
                    "--controller",
                    self.controller_address,
                    "--node-id",
                    self.args.node_id,
                    "--metrics-port",
                    str(self.args.scheduler_metrics_port),
                    "--replica-ports",
                    self.args.replica_ports,
                    "--replica-metrics-ports",
                    self.args.replica_metrics_ports,
                    *self.creds.child_arguments(),
                    *fmt,
                ],
                stop_timeout_s=drain + 30,
            ),
            Child(
                "gateway",
                [
                    *py,
                    "gateway",
                    "--controller",
                    self.controller_address,
                    "--config",
                    str(config_path),
                    "--host",
                    gw.host,
                    "--port",
                    str(gw.port),
                    *fmt,
                ],
                stop_timeout_s=drain + 15,
            ),
        ]

    def _check_ports(self) -> str | None:
        ctl, gw = self.config.controller, self.config.gateway
        wanted = [
            (ctl.host, ctl.port, "controller.port (or --controller-port)"),
            (gw.host, gw.port, "gateway.port (or --port)"),
        ]
        if ctl.metrics_port:
            wanted.append((ctl.host, ctl.metrics_port, "controller.metrics_port"))
        if self.args.scheduler_metrics_port:
            port = self.args.scheduler_metrics_port
            wanted.append(("127.0.0.1", port, "--scheduler-metrics-port"))
        for host, port, setting in wanted:
            if not port_is_free(host, port):
                return f"port {port} on {host} is in use; stop what holds it or set {setting}"
        return None

    async def main(self) -> int:
        problem = self._check_ports()
        if problem:
            sys.stderr.write(f"mss up: {problem}\n")
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        state, config_path = self._prepare_files()
        self.children = self._children(state, config_path)
        code = 0
        try:
            for child in self.children:
                await child.start(env)
            code = await self._wait_ready()
            if code == 0:
                code = await self._serve()
        finally:
            await self._shutdown()
        return code

    def _on_signal(self) -> None:
        if self.stop.is_set():  # a second Ctrl-C: stop waiting for drains
            for child in self.children:
                if child.proc is not None and child.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.proc.pid, signal.SIGKILL)
            return
        self.stop.set()

    def _dead_child(self) -> Child | None:
        for child in self.children:
            if child.proc is not None and child.proc.returncode is not None:
                return child
        return None

    async def _wait_ready(self) -> int:
        names = [d.name for d in self.config.deployments if d.replicas > 0]
        say(f"starting {', '.join(names) or 'no models'}; waiting for replicas to be ready")
        at_zero = [d.name for d in self.config.deployments if d.replicas == 0 and d.autoscaling]
        if at_zero:
            say(f"{', '.join(at_zero)}: autoscaled, no replica until the first request")
        if any(d.engine == "vllm" for d in self.config.deployments):
            say("the bundled model's first start converts it and loads the engine (~40 s)")
        started = time.monotonic()
        last_line, last_said = "", 0.0
        async with (
            channel(
                self.controller_address, self.creds, "controller", UNARY_CHANNEL_OPTIONS
            ) as status_channel,
            # The gateway is this command's own child on loopback; its HTTPS
            # certificate need not name 127.0.0.1, so it is not checked here.
            httpx.AsyncClient(timeout=2.0, verify=False) as http,
        ):
            stub = controller_pb2_grpc.ControllerStub(status_channel)
            while not self.stop.is_set():
                dead = self._dead_child()
                if dead is not None:
                    code = dead.proc.returncode if dead.proc else "?"
                    say(f"{dead.name} exited with code {code}")
                    return 1
                elapsed = time.monotonic() - started
                if elapsed > self.args.ready_timeout:
                    say(f"not ready after {self.args.ready_timeout:.0f} s; stopping")
                    return 1
                line, ready = await self._progress(stub, names)
                if ready and await self._gateway_ready(http):
                    self._print_ready(elapsed)
                    return 0
                now = time.monotonic()
                if line and (line != last_line or now - last_said > 10):
                    say(f"{line} ({elapsed:.0f} s)")
                    last_line, last_said = line, now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.5)
        return 0

    async def _progress(
        self, stub: controller_pb2_grpc.ControllerStub, names: list[str]
    ) -> tuple[str, bool]:
        try:
            status = await stub.Status(
                pb.StatusRequest(), timeout=2.0, metadata=self.creds.metadata()
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return f"the controller refused us: {exc.details()}", False
            return "waiting for the controller", False
        running = {d.name: d.running_replicas for d in status.deployments}
        parts = []
        for name in names:
            states = [
                state_name(r.status.state)
                + (
                    f": {r.status.message}"
                    if r.status.message and r.status.state != RUNNING
                    else ""
                )
                for r in status.replicas
                if r.status.deployment == name and r.keep
            ]
            target = next((d.target_replicas for d in status.deployments if d.name == name), 0)
            detail = f" [{'; '.join(states)}]" if states and running.get(name, 0) < target else ""
            parts.append(f"{name} {running.get(name, 0)}/{target} running{detail}")
        if not status.nodes:
            parts.append("waiting for the scheduler to register")
        ready = all(running.get(name, 0) > 0 for name in names)
        return ", ".join(parts), ready

    async def _gateway_ready(self, http: httpx.AsyncClient) -> bool:
        try:
            reply = await http.get(f"{self.gateway_url}/ready")
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    def _print_ready(self, elapsed: float) -> None:
        model = self.config.deployments[0].name if self.config.deployments else "MODEL"
        body = (
            '{"messages":[{"role":"user","content":"What is the capital of France?"}],'
            '"temperature":0}'
        )
        sec = self.config.security
        cacert = ""
        if sec.https_cert_file and sec.tls_dir:
            cacert = f"--cacert {os.path.join(os.path.expanduser(sec.tls_dir), 'ca.crt')} "
        admin = f" --tls-dir {sec.tls_dir}" if sec.tls_dir else ""
        lines = [
            f"ready in {elapsed:.1f} s. Try:",
            "",
            f"  curl -N {cacert}-X POST {self.gateway_url}/v1/chat/{model} "
            f"-H 'Content-Type: application/json' -d '{body}'",
            "",
            "or with the openai package:",
            "  from openai import OpenAI",
            f'  client = OpenAI(base_url="{self.gateway_url}/v1", api_key="none")',
            f'  for chunk in client.chat.completions.create(model="{model}", stream=True,',
            '          messages=[{"role": "user", "content": "Hello"}]):',
            '      print(chunk.choices[0].delta.content or "", end="")',
            "",
            f"status: mss status --controller {self.controller_address}{admin}    "
            f"scale: mss scale {model} N --controller {self.controller_address}{admin}",
            "Ctrl-C stops everything.",
        ]
        for line in lines:
            say(line)

    async def _serve(self) -> int:
        while not self.stop.is_set():
            dead = self._dead_child()
            if dead is not None:
                code = dead.proc.returncode if dead.proc else "?"
                say(f"{dead.name} exited unexpectedly with code {code}; stopping everything")
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.5)
        return 0

    async def _shutdown(self) -> None:
        running = [c for c in self.children if c.proc is not None and c.proc.returncode is None]
        if running:
            say("stopping: gateway, then scheduler and replicas, then controller")
        by_name = {c.name: c for c in self.children}
        for name in ("gateway", "scheduler", "controller"):
            child = by_name.get(name)
            if child is not None:
                await child.stop()
        say("stopped")
