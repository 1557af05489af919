"""What the tests share: real processes on free ports, a replica stream client, SSE parsing.

- Processes: `spawn` runs `mss ARGS...` in its own process group with its
  output in a log file; `start_replica` and `start_gateway` wait until the
  process answers ready.
- `StreamClient`: a small multiplexing client of a replica's Generate stream.
- `sse_events`: parses an SSE body the way a client does.
- `RecordingEngine`: the fake engine, recording tokenization and aborts.
- `start_redis`: a throwaway `redis-server` for the response cache's Redis tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from mss.config import Deployment
from mss.processes import free_port
from mss.security import local_metadata
from protos import replica_pb2, replica_pb2_grpc
from replica.engine import Delta, Prepared, PromptSource
from replica.fake_engine import FakeEngine

__all__ = ["free_port"]

ROOT = Path(__file__).resolve().parent.parent


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


def scheduler_args(controller: str, node_id: str, port_base: int) -> list[str]:
    """`mss scheduler` offering 4 CPUs and 8 GiB, replicas on 25 ports from `port_base`
    and their metrics on the next 25, no metrics port of its own."""
    return [
        "scheduler",
        "--controller",
        controller,
        "--node-id",
        node_id,
        "--metrics-port",
        "0",
        "--cpus",
        "4",
        "--memory-gib",
        "8",
        "--replica-ports",
        f"{port_base}-{port_base + 24}",
        "--replica-metrics-ports",
        f"{port_base + 25}-{port_base + 49}",
    ]


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


class _AddToken:
    """Adds the cluster token to a test channel's calls. grpc.aio files an interceptor
    under the first call kind it is an instance of, so each kind has its own class."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _TokenUnaryUnary(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.details(details), request)


class _TokenUnaryStream(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.details(details), request)


class _TokenStreamUnary(_AddToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self.details(details), requests)


class _TokenStreamStream(_AddToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self.details(details), requests)


def member_channel(address: str) -> grpc.aio.Channel:
    """An asyncio channel whose calls carry the cluster token, as a gateway's or scheduler's do."""
    metadata = local_metadata()
    kinds = (_TokenUnaryUnary, _TokenUnaryStream, _TokenStreamUnary, _TokenStreamStream)
    return grpc.aio.insecure_channel(address, interceptors=[kind(metadata) for kind in kinds])


def health(address: str, timeout: float = 2.0) -> replica_pb2.HealthResponse:
    with grpc.insecure_channel(address) as channel:
        stub = replica_pb2_grpc.ReplicaStub(channel)
        return stub.Health(replica_pb2.HealthRequest(), timeout=timeout, metadata=local_metadata())


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


def write_config(text: str) -> str:
    fd, path = tempfile.mkstemp(prefix="mss-gateway-", suffix=".yaml")
    Path(path).write_text(text)
    os.close(fd)
    return path


def start_gateway(
    replicas: list[tuple[str, str]],
    *,
    config: str | None = None,
    extra: list[str] | None = None,
    ready: bool = True,
    timeout: float = 30.0,
) -> Proc:
    """`mss gateway` on a free port; waits for /ready (or only /health when ready=False)."""
    port = free_port()
    args = ["gateway", "--port", str(port), *(extra or [])]
    for model, address in replicas:
        args += ["--replica", f"{model}={address}"]
    if config is not None:
        args += ["--config", write_config(config)]
    proc = spawn(args, f"gateway-{port}")
    proc.address = f"http://127.0.0.1:{port}"
    path = "/ready" if ready else "/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"gateway exited:\n{proc.log()[-3000:]}")
        try:
            if httpx.get(proc.address + path, timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"gateway not {path} after {timeout} s:\n{proc.log()[-3000:]}")


def start_redis(binary: str, port: int | None = None, timeout: float = 10.0) -> Proc:
    """`redis-server` on loopback (a free port unless given), keeping nothing on disk; waits
    until it answers PING. `proc.address` is its redis:// URL."""
    port = port or free_port()
    fd, path = tempfile.mkstemp(prefix=f"mss-redis-{port}-", suffix=".log")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", tempfile.gettempdir()]
    proc = subprocess.Popen(
        args, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    os.close(fd)
    server = Proc(proc=proc, log_path=Path(path), address=f"redis://127.0.0.1:{port}/0")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"redis-server exited:\n{server.log()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return server
        except OSError:
            pass
        time.sleep(0.02)
    server.kill()
    raise TimeoutError(f"redis-server not answering after {timeout} s:\n{server.log()[-3000:]}")


FAKE_MODEL = "smollm2"
FAKE_MAX_TOKENS = 24
FAKE_GATEWAY_CONFIG = f"""
gateway:
  max_body_bytes: 4096
deployments:
  - name: {FAKE_MODEL}
    engine: fake
    model: fake
    limits: {{max_tokens: {FAKE_MAX_TOKENS}}}
"""
"""The gateway API tests' config: a small body limit and max_tokens bound, the fake engine."""


@contextlib.contextmanager
def fake_stack(model: str, config: str | None = None) -> Iterator[tuple[Proc, Proc]]:
    """A fake-engine replica behind `mss gateway` (static route), stopped on exit."""
    replica = start_replica(token_interval_ms=2)
    gateway = None
    try:
        gateway = start_gateway([(model, replica.address)], config=config)
        yield replica, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        replica.stop()


def sse_events(text: str) -> list[tuple[str | None, dict[str, object] | str]]:
    """(event name, data) per event, parsed the way an SSE client does."""
    out: list[tuple[str | None, dict[str, object] | str]] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        payload = "\n".join(data)
        out.append((name, payload if payload == "[DONE]" else json.loads(payload)))
    return out


@dataclass
class Result:
    """One request's deltas gathered; `text` and `finish_reason` are choice 0's."""

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_code: int = 0
    error_message: str = ""
    deltas: int = 0
    tokens: int = 0
    loads: list[replica_pb2.Load] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)
    """Each choice's text, by index."""
    finish_reasons: dict[int, str] = field(default_factory=dict)
    stop_reasons: dict[int, str] = field(default_factory=dict)
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[replica_pb2.TokenLogprob]] = field(default_factory=dict)
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[replica_pb2.TokenLogprob] = field(default_factory=list)
    all_deltas: list[replica_pb2.RequestDelta] = field(default_factory=list)

    def add(self, delta: replica_pb2.RequestDelta) -> None:
        i = delta.index
        self.all_deltas.append(delta)
        self.deltas += 1
        self.tokens += delta.num_tokens
        self.texts[i] = self.texts.get(i, "") + delta.text
        self.token_ids.setdefault(i, []).extend(delta.token_ids)
        self.logprobs.setdefault(i, []).extend(delta.logprobs)
        self.prompt_token_ids.extend(delta.prompt_token_ids)
        self.prompt_logprobs.extend(delta.prompt_logprobs)
        if delta.finish_reason:
            self.finish_reasons[i] = delta.finish_reason
            if delta.stop_reason:
                self.stop_reasons[i] = delta.stop_reason
        self.text = self.texts.get(0, "")
        self.finish_reason = self.finish_reasons.get(0, delta.finish_reason)
        if delta.prompt_tokens or delta.completion_tokens:
            self.prompt_tokens = delta.prompt_tokens
            self.completion_tokens = delta.completion_tokens
        if delta.error.code:
            self.error_code = delta.error.code
            self.error_message = delta.error.message
            self.finish_reason = delta.finish_reason


class StreamClient:
    """One Generate stream; `run()` sends a request and collects its result."""

    def __init__(self, address: str) -> None:
        self.channel = member_channel(address)
        self.stub = replica_pb2_grpc.ReplicaStub(self.channel)
        self.outgoing: asyncio.Queue[replica_pb2.GenerateClientMessage | None] = asyncio.Queue()
        self.waiters: dict[str, asyncio.Queue[replica_pb2.RequestDelta]] = {}
        self.replies = 0
        self.call = self.stub.Generate(self._messages())
        self.reader = asyncio.create_task(self._read())

    async def _messages(self) -> AsyncIterator[replica_pb2.GenerateClientMessage]:
        while (message := await self.outgoing.get()) is not None:
            yield message

    async def _read(self) -> None:
        async for reply in self.call:
            self.replies += 1
            for delta in reply.deltas:
                queue = self.waiters.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
                    self.last_load = reply.load

    def send(self, request: replica_pb2.GenerateRequest) -> asyncio.Queue[replica_pb2.RequestDelta]:
        queue: asyncio.Queue[replica_pb2.RequestDelta] = asyncio.Queue()
        self.waiters[request.request_id] = queue
        self.outgoing.put_nowait(replica_pb2.GenerateClientMessage(request=request))
        return queue

    def cancel(self, request_id: str) -> None:
        self.outgoing.put_nowait(
            replica_pb2.GenerateClientMessage(
                cancel=replica_pb2.CancelRequest(request_id=request_id)
            )
        )

    async def run(self, request: replica_pb2.GenerateRequest, timeout: float = 120) -> Result:
        """Send `request` and gather its deltas until all its choices finish (or it fails)."""
        queue = self.send(request)
        result = Result()
        choices = request.sampling.n or 1
        async with asyncio.timeout(timeout):
            while True:
                delta = await queue.get()
                result.add(delta)
                if delta.error.code or len(result.finish_reasons) == choices:
                    return result

    async def health(self) -> replica_pb2.HealthResponse:
        return await self.stub.Health(replica_pb2.HealthRequest(), timeout=5)

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        try:
            await asyncio.wait_for(self.reader, 10)
        except (TimeoutError, grpc.aio.AioRpcError):
            self.reader.cancel()
        await self.channel.close()


def chat(request_id: str, content: str, **sampling: object) -> replica_pb2.GenerateRequest:
    """One user message; keyword arguments are `SamplingParams` fields."""
    return replica_pb2.GenerateRequest(
        request_id=request_id,
        messages=[replica_pb2.ChatMessage(role="user", content=content)],
        sampling=replica_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


def completion(request_id: str, prompt: str, **sampling: object) -> replica_pb2.GenerateRequest:
    """A plain prompt; keyword arguments are `SamplingParams` fields."""
    return replica_pb2.GenerateRequest(
        request_id=request_id,
        prompt=prompt,
        sampling=replica_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


LONG = " and so on" * 120
"""Makes a prompt long enough to be prepared on the tokenizer thread, not on the loop."""


class RecordingEngine(FakeEngine):
    """The fake engine, recording which thread tokenized, in what order, and what was aborted."""

    def __init__(self, token_interval_ms: float = 0.0) -> None:
        super().__init__(
            Deployment.model_validate(
                {
                    "name": "echo",
                    "model": "fake",
                    "engine": "fake",
                    "engine_args": {"token_interval_ms": token_interval_ms},
                }
            )
        )
        self.tokenized_on: list[int] = []
        self.tokenized: list[str] = []
        self.aborted: list[str] = []
        self.tokenizing = threading.Event()
        """Set when a slow prompt's tokenization begins."""
        self.streaming = asyncio.Event()
        """Set when a request reaches the engine."""

    def _tokenize(self, source: PromptSource) -> tuple[str, list[int]]:
        self.tokenized_on.append(threading.get_ident())
        if source.prompt.startswith("slow"):
            self.tokenizing.set()
            time.sleep(0.2)
        self.tokenized.append(source.prompt)
        return super()._tokenize(source)

    async def _stream(self, prepared: Prepared) -> AsyncGenerator[Delta, None]:
        async with contextlib.aclosing(super()._stream(prepared)) as deltas:
            self.streaming.set()
            async for delta in deltas:
                yield delta

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        await super().abort(request_id)
