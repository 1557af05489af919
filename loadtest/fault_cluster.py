"""A cluster to break on purpose, and closed-loop clients that check every answer.

What `loadtest.fault_run` (the per-phase table) and the fault tests share:

- `Hosts`: where each role runs. With root, test hosts in network namespaces
  made by `../shared/netns.py` (from the repository root), named `msf-h1..h5`
  on 10.212.0.0/24 so they never meet other tests' hosts: the controller on
  h1, a scheduler node on each of h2 and h3, the gateway on h4, the clients on
  h5; a node's link can be cut and healed. Without root, every role on
  127.0.0.1 (no partition).
- `Cluster`: the controller, two schedulers each running two fake-engine
  replicas, and a gateway following the controller, all reading one cluster
  token file; kill any of them outright, restart, read the controller's Status.
- `Load`: closed-loop clients on four kinds of request (the seed route
  streamed, OpenAI completions and chat streamed, OpenAI chat as one body).
  The fake engine's text depends only on the prompt, so each answer is
  compared with the text of an uninterrupted run, and each stream's timing is
  kept: time to first text, gaps between texts, and its longest wait.
- `summarize`: one phase's requests as a table row.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import yaml

from mss.processes import free_port
from mss.rpc import UNARY_CHANNEL_OPTIONS
from mss.security import read_or_create_token
from protos import controller_pb2 as pb
from protos import controller_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
NETNS_SCRIPT = ROOT.parent / "shared" / "netns.py"
NETNS_PREFIX = "msf"
NETNS_NET = "10.212.0"
CONTROLLER_HOST = 1
NODE_HOSTS = (2, 3)
GATEWAY_HOST = 4
CLIENT_HOST = 5

MODEL = "story"
TOKENS = 40
INTERVAL_MS = 20
"""Each request streams 40 tokens 20 ms apart: 0.8 s when nothing goes wrong."""
REPLICAS_PER_NODE = 2
HEARTBEAT_S = 0.5
DEAD_AFTER = 10
"""A node silent for 5 s is dead: long enough for a killed scheduler to be restarted and
keep its node's replicas, short enough that a 15 s partition moves them."""
DRAIN_S = 0.2
"""Drain deadline of a stopping replica (a killed scheduler's replicas are told to stop):
past it, its requests are cancelled and move to another replica."""
HUNG_S = 30.0
"""A request with no end after this long is counted hung (a move waits at most 10 s)."""


def netns(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `../shared/netns.py ARGS...` on this run's hosts."""
    env = {**os.environ, "NETNS_PREFIX": NETNS_PREFIX, "NETNS_NET": NETNS_NET}
    return subprocess.run(
        [sys.executable, str(NETNS_SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass(frozen=True)
class Hosts:
    """Where the roles run: network namespaces (`netns`) or all on 127.0.0.1."""

    netns: bool

    def ip(self, host: int) -> str:
        return f"{NETNS_NET}.{host}" if self.netns else "127.0.0.1"

    def argv(self, host: int, argv: list[str]) -> list[str]:
        if not self.netns:
            return argv
        return ["ip", "netns", "exec", f"{NETNS_PREFIX}-h{host}", *argv]

    def cut(self, host: int) -> None:
        self._link("cut", host)

    def heal(self, host: int) -> None:
        self._link("heal", host)

    def _link(self, how: str, host: int) -> None:
        if not self.netns:
            raise RuntimeError("partitions need network namespaces (root)")
        out = netns(how, str(host))
        if out.returncode != 0:
            raise RuntimeError(f"netns.py {how} {host}: {out.stderr}")


@dataclass
class Process:
    """One role's process and its log."""

    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 2500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Cluster:
    """Controller, two scheduler nodes with fake-engine replicas, one gateway."""

    def __init__(self, folder: Path, hosts: Hosts) -> None:
        self.folder = folder
        self.hosts = hosts
        self.token_file = folder / "cluster.token"
        token = read_or_create_token(self.token_file)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.procs: dict[str, Process] = {}
        self.starts = 0
        if hosts.netns:  # each host has its own ports
            self.controller_port, self.gateway_port = 50051, 8000
            self.port_base = 50100
        else:
            self.controller_port, self.gateway_port = free_port(), free_port()
            self.port_base = random.randrange(20000, 40000, 200)
        self.config = folder / "cluster.yaml"
        self.config.write_text(yaml.safe_dump(self._config()))

    @property
    def controller(self) -> str:
        return f"{self.hosts.ip(CONTROLLER_HOST)}:{self.controller_port}"

    @property
    def url(self) -> str:
        return f"http://{self.hosts.ip(GATEWAY_HOST)}:{self.gateway_port}"

    @property
    def replicas(self) -> int:
        return REPLICAS_PER_NODE * len(NODE_HOSTS)

    def _config(self) -> dict[str, Any]:
        deployment = {
            "name": MODEL,
            "model": "fake",
            "engine": "fake",
            "replicas": 0,  # grown once both nodes joined, so it spreads over them
            "engine_args": {"token_interval_ms": INTERVAL_MS},
            "resources": {"cpus": 1, "memory_gib": 1},
            "limits": {"max_tokens": TOKENS},
        }
        controller = {
            "host": self.hosts.ip(CONTROLLER_HOST),
            "port": self.controller_port,
            "metrics_port": 0,
            "state_path": str(self.folder / "controller.sqlite"),
            "heartbeat_interval_s": HEARTBEAT_S,
            "dead_after_heartbeats": DEAD_AFTER,
            "drain_timeout_s": DRAIN_S,
        }
        return {"deployments": [deployment], "controller": controller}

    def _spawn(self, name: str, host: int, args: list[str]) -> Process:
        self.starts += 1
        log = self.folder / f"{name}-{self.starts}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "mss.cli", *args, "--token-file", str(self.token_file)]
        with log.open("wb") as out:
            popen = subprocess.Popen(
                self.hosts.argv(host, argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
        self.procs[name] = Process(popen, log)
        return self.procs[name]

    def start_controller(self) -> None:
        self._spawn("controller", CONTROLLER_HOST, ["controller", "--config", str(self.config)])

    def start_scheduler(self, index: int) -> None:
        host = NODE_HOSTS[index]
        base = self.port_base + index * 50
        args = [
            "scheduler",
            "--controller",
            self.controller,
            "--node-id",
            self.node_id(index),
            "--host",
            self.hosts.ip(host),
            "--metrics-port",
            "0",
            "--cpus",
            str(self.replicas),  # room for every replica: a node can take the other's
            "--memory-gib",
            "8",
            "--replica-ports",
            f"{base}-{base + 24}",
            "--replica-metrics-ports",
            f"{base + 25}-{base + 49}",
        ]
        self._spawn(self.node_id(index), host, args)

    def start_gateway(self) -> None:
        args = [
            "gateway",
            "--controller",
            self.controller,
            "--host",
            self.hosts.ip(GATEWAY_HOST),
            "--port",
            str(self.gateway_port),
        ]
        self._spawn("gateway", GATEWAY_HOST, args)

    @staticmethod
    def node_id(index: int) -> str:
        return f"n{index + 1}"

    async def start(self) -> None:
        """Every role, then the deployment grown to two replicas per node; waits until served."""
        self.start_controller()
        for index in range(len(NODE_HOSTS)):
            self.start_scheduler(index)
        self.start_gateway()
        await self.wait_for("both nodes", lambda s: sum(n.alive for n in s.nodes) == 2, 60)
        async with self._channel() as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            request = pb.ScaleRequest(deployment=MODEL, replicas=self.replicas)
            await stub.Scale(request, timeout=5, metadata=self.metadata)
        await self.wait_for("the replicas, spread", self.spread, 60)
        await self.wait_gateway_ready()

    def _channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.controller, options=UNARY_CHANNEL_OPTIONS)

    async def status(self) -> pb.StatusResponse:
        async with self._channel() as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            reply: pb.StatusResponse = await stub.Status(
                pb.StatusRequest(), timeout=2, metadata=self.metadata
            )
            return reply

    async def wait_for(
        self, what: str, check: Callable[[pb.StatusResponse], bool], within: float
    ) -> pb.StatusResponse:
        deadline = time.monotonic() + within
        last: pb.StatusResponse | None = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                last = await self.status()
                if check(last):
                    return last
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last status:\n{last}\n{self.logs()}")

    async def wait_gateway_ready(self, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    if (await http.get(f"{self.url}/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"gateway not ready\n{self.logs()}")

    def running(self, status: pb.StatusResponse) -> list[pb.ReplicaView]:
        """Replicas that are wanted, RUNNING, and on a live node."""
        alive = {n.node.node_id for n in status.nodes if n.alive}
        return [
            r
            for r in status.replicas
            if r.keep and r.status.state == pb.RUNNING and r.node_id in alive
        ]

    def full(self, status: pb.StatusResponse) -> bool:
        return len(self.running(status)) == self.replicas

    def spread(self, status: pb.StatusResponse) -> bool:
        """Full strength, two replicas on each node."""
        nodes = [r.node_id for r in self.running(status)]
        return self.full(status) and all(
            nodes.count(self.node_id(i)) == REPLICAS_PER_NODE for i in range(len(NODE_HOSTS))
        )

    def kill(self, name: str) -> None:
        """SIGKILL one role's process (a scheduler's replicas are in their own sessions)."""
        proc = self.procs[name]
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(10)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            code = proc.popen.poll()
            if code is not None and code != -signal.SIGKILL:
                raise AssertionError(f"{name} exited with {code}:\n{proc.tail()}")

    async def gateway_metrics(self, name: str) -> list[tuple[str, float]]:
        """The gateway's samples of metric `name`: (labels, value) each."""
        async with httpx.AsyncClient(timeout=5.0) as http:
            text = (await http.get(f"{self.url}/metrics")).text
        samples = []
        for line in text.splitlines():
            if line.startswith(name + "{"):
                labels, value = line[len(name) :].rsplit(" ", 1)
                samples.append((labels, float(value)))
        return samples

    async def migrations(self) -> dict[str, float]:
        """The gateway's migration counts by outcome (moved, gave_up)."""
        counts: dict[str, float] = {}
        for labels, value in await self.gateway_metrics("mss_gateway_migrations_total"):
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = counts.get(outcome, 0.0) + value
        return counts

    async def in_flight_after_load(self, within: float = 5.0) -> float:
        """Requests the gateway still holds once every client has its answer: 0 unless a
        request was never released (the gauge is refreshed once a second)."""
        deadline = time.monotonic() + within
        while True:
            held = sum(v for _, v in await self.gateway_metrics("mss_gateway_in_flight"))
            if held == 0 or time.monotonic() > deadline:
                return held
            await asyncio.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{proc.tail()}" for name, proc in self.procs.items())

    def stop(self) -> None:
        """SIGTERM every role (gateway first, controller last), SIGKILL what lingers."""
        order = ["gateway", *(self.node_id(i) for i in range(len(NODE_HOSTS))), "controller"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.popen.poll() is not None:
                continue
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)


# ----- load ---------------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """One request: when it ran, how its text arrived, how it ended."""

    phase: str
    kind: str
    started: float
    ended: float = 0.0
    ttft: float | None = None
    """Seconds to the first text (streams only)."""
    gaps: list[float] = field(default_factory=list)
    """Seconds between consecutive texts (streams only)."""
    stall: float = 0.0
    """Longest wait for the answer's next text, the first one included (streams only)."""
    outcome: str = ""
    """ok, cut (an error event or HTTP failure), wrong (text differs) or hung."""
    detail: str = ""


def prompt(client: int) -> str:
    return f"client {client} asks for a story"


class _Cut(Exception):
    """The answer ended with an error (an HTTP failure status or an error event)."""


KINDS = ("seed", "completion", "chat", "chat_body")
"""Client i sends kind i % 4: the seed route streamed, OpenAI completions streamed,
OpenAI chat streamed, OpenAI chat as one body."""


def _request(kind: str, text: str) -> tuple[str, dict[str, object]]:
    messages = [{"role": "user", "content": text}]
    if kind == "seed":
        return f"/v1/chat/{MODEL}", {"messages": messages, "max_tokens": TOKENS}
    if kind == "completion":
        body = {"model": MODEL, "prompt": text, "max_tokens": TOKENS, "stream": True}
        return "/v1/completions", body
    body = {"model": MODEL, "messages": messages, "max_tokens": TOKENS}
    return "/v1/chat/completions", {**body, "stream": kind == "chat"}


def _text_of(data: dict[str, Any]) -> str:
    """The text one event carries (seed token, completion text or chat delta)."""
    if "error" in data or data.get("finish_reason") == "error":
        raise _Cut(f"error event: {orjson.dumps(data)[:300].decode()}")
    choices = data.get("choices")
    if isinstance(choices, list) and choices:
        choice = choices[0]
        if "text" in choice:
            return str(choice.get("text") or "")
        return str((choice.get("delta") or {}).get("content") or "")
    return str(data.get("token") or "")


async def _stream(http: httpx.AsyncClient, kind: str, text: str, record: Record) -> str:
    path, body = _request(kind, text)
    out: list[str] = []
    last = record.started
    async with http.stream("POST", path, json=body) as reply:
        if reply.status_code != 200:
            raise _Cut(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if line.startswith("event:") and line[6:].strip() == "error":
                raise _Cut("error event")
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            piece = _text_of(orjson.loads(line[5:]))
            if not piece:
                continue
            now = time.monotonic()
            if record.ttft is None:
                record.ttft = now - record.started
            else:
                record.gaps.append(now - last)
            record.stall = max(record.stall, now - last)
            last = now
            out.append(piece)
    return "".join(out)


async def _body(http: httpx.AsyncClient, kind: str, text: str, record: Record) -> str:
    path, body = _request(kind, text)
    reply = await http.post(path, json=body)
    if reply.status_code != 200:
        raise _Cut(f"HTTP {reply.status_code}: {reply.text[:300]}")
    return str(reply.json()["choices"][0]["message"]["content"])


async def references(url: str, clients: int) -> dict[tuple[int, str], str]:
    """Each client's expected text per kind, from uninterrupted runs before any fault."""
    async with httpx.AsyncClient(base_url=url, timeout=HUNG_S) as http:

        async def one(client: int) -> tuple[str, str]:
            record = Record("reference", "", time.monotonic())
            completion = await _stream(http, "completion", prompt(client), record)
            chat = await _body(http, "chat_body", prompt(client), record)
            return completion, chat

        texts = await asyncio.gather(*(one(i) for i in range(clients)))
    return {
        (i, kind): completion if kind == "completion" else chat
        for i, (completion, chat) in enumerate(texts)
        for kind in KINDS
    }


class Load:
    """Closed-loop clients; each request is filed under the phase in which it ended (a
    fault strikes as its phase begins, so the streams it interrupts count there)."""

    def __init__(self, url: str, clients: int, expected: dict[tuple[int, str], str]) -> None:
        self.url = url
        self.clients = clients
        self.expected = expected
        self.phase = ""
        self.records: list[Record] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, phase: str) -> None:
        self.phase = phase
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Let every request in flight end (or be counted hung), then stop."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        # One connection pool made before any request, so no client's timing includes
        # another's setup.
        limits = httpx.Limits(max_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.url, timeout=HUNG_S, limits=limits) as http:
            await asyncio.gather(*(self._client(http, i) for i in range(self.clients)))

    async def _client(self, http: httpx.AsyncClient, client: int) -> None:
        kind = KINDS[client % len(KINDS)]
        send = _body if kind == "chat_body" else _stream
        want = self.expected[(client, kind)]
        while not self._stop.is_set():
            record = Record("", kind, time.monotonic())
            try:
                got = await asyncio.wait_for(send(http, kind, prompt(client), record), HUNG_S)
            except (TimeoutError, httpx.TimeoutException) as exc:
                record.outcome, record.detail = "hung", repr(exc)
            except (_Cut, httpx.HTTPError, orjson.JSONDecodeError) as exc:
                record.outcome, record.detail = "cut", str(exc) or repr(exc)
            else:
                record.outcome = "ok" if got == want else "wrong"
                if got != want:
                    record.detail = f"{got!r} != {want!r}"
            record.ended = time.monotonic()
            record.phase = self.phase
            self.records.append(record)


# ----- the table ---------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p % of them at or below
    it; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize(phase: str, records: list[Record], extra: dict[str, object]) -> dict[str, object]:
    """One phase's row: counts by outcome, TTFT and ITL percentiles (ms), longest stall (s)."""
    mine = [r for r in records if r.phase == phase]
    streams = [r for r in mine if r.ttft is not None]
    ttft = [r.ttft * 1000 for r in streams if r.ttft is not None]
    itl = [gap * 1000 for r in streams for gap in r.gaps]
    row: dict[str, object] = {
        "phase": phase,
        "requests": len(mine),
        **{outcome: sum(r.outcome == outcome for r in mine) for outcome in OUTCOMES},
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50),
        "itl_p99_ms": percentile(itl, 99),
        "max_stall_s": max((r.stall for r in streams), default=None),
        "failures": [f"{r.kind}: {r.outcome}: {r.detail}" for r in mine if r.outcome != "ok"][:5],
    }
    row.update(extra)
    return row


OUTCOMES = ("ok", "cut", "wrong", "hung")

COLUMNS = [
    ("phase", "phase", "{}"),
    ("requests", "requests", "{}"),
    ("ok", "ok", "{}"),
    ("cut", "cut", "{}"),
    ("wrong", "wrong text", "{}"),
    ("hung", "hung", "{}"),
    ("moved", "moved", "{:.0f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"),
    ("itl_p99_ms", "ITL p99 ms", "{:.1f}"),
    ("max_stall_s", "max stall s", "{:.2f}"),
    ("recovery_s", "recovery s", "{:.1f}"),
]


def table(rows: list[dict[str, object]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = []
        for key, _, form in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else form.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
