"""The secured cluster with real processes: who gets in, and who is turned away.

A controller, a scheduler with fake-engine replicas and a gateway run with a
cluster token of their own (not the default file), then with mutual TLS and
HTTPS. Intruders are what an attacker on the same network would run: a
scheduler without the token or with a certificate from another CA, admin
calls without credentials, a Generate sent straight to a replica's port.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import random
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from mss import certs
from mss.config import SecuritySettings
from mss.replica_states import RUNNING
from mss.rpc import UNARY_CHANNEL_OPTIONS
from mss.rpc_auth import channel
from mss.security import Credentials, load_credentials
from protos import controller_pb2 as pb
from protos import controller_pb2_grpc, replica_pb2, replica_pb2_grpc
from tests.support import Proc, free_port, scheduler_args, spawn

HEARTBEAT_S = 0.5


@dataclass
class Cluster:
    """Controller, schedulers and a gateway sharing `security` (a config block)."""

    tmp: Path
    security: dict[str, Any]
    controller_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)

    @property
    def controller(self) -> str:
        return f"127.0.0.1:{self.controller_port}"

    @property
    def scheme(self) -> str:
        return "https" if self.security.get("https_cert_file") else "http"

    def admin(self) -> Credentials:
        return load_credentials(SecuritySettings.model_validate(self.security), "admin")

    def start(self) -> None:
        config = {
            "deployments": [
                {
                    "name": "echo",
                    "model": "fake",
                    "engine": "fake",
                    "replicas": 1,
                    "engine_args": {"token_interval_ms": 5},
                    "resources": {"cpus": 0.5, "memory_gib": 0.5},
                }
            ],
            "controller": {
                "port": self.controller_port,
                "metrics_port": 0,
                "state_path": str(self.tmp / "controller.sqlite"),
                "heartbeat_interval_s": HEARTBEAT_S,
                "drain_timeout_s": 2,
            },
            "gateway": {"port": self.gateway_port},
            "security": self.security,
        }
        path = self.tmp / "cluster.yaml"
        path.write_text(yaml.safe_dump(config))
        self.procs.append(spawn(["controller", "--config", str(path)], "controller"))
        flags = ["--token-file", self.security["token_file"]]
        if "tls_dir" in self.security:
            flags += ["--tls-dir", self.security["tls_dir"]]
        self.scheduler("good", flags)
        self.procs.append(
            spawn(
                ["gateway", "--controller", self.controller, "--config", str(path)],
                "gateway",
            )
        )

    def scheduler(self, node_id: str, flags: list[str]) -> Proc:
        base = random.randrange(20000, 40000, 100)
        proc = spawn(
            [*scheduler_args(self.controller, node_id, base), *flags],
            f"scheduler-{node_id}",
        )
        self.procs.append(proc)
        return proc

    async def status(self) -> pb.StatusResponse:
        creds = self.admin()
        async with channel(self.controller, creds, "controller", UNARY_CHANNEL_OPTIONS) as ch:
            stub = controller_pb2_grpc.ControllerStub(ch)
            return await stub.Status(pb.StatusRequest(), timeout=3, metadata=creds.metadata())

    async def wait_for(
        self, what: str, check: Callable[[pb.StatusResponse], bool], within: float = 30
    ) -> pb.StatusResponse:
        deadline = time.monotonic() + within
        while True:
            try:
                status = await self.status()
                if check(status):
                    return status
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(p.log()[-1500:] for p in self.procs)
                raise AssertionError(f"not {what} within {within} s\n{logs}")
            await asyncio.sleep(0.2)

    def client(self) -> httpx.AsyncClient:
        verify: Any = True
        if self.scheme == "https":
            verify = ssl.create_default_context(cafile=f"{self.security['tls_dir']}/ca.crt")
        base = f"{self.scheme}://localhost:{self.gateway_port}"
        return httpx.AsyncClient(base_url=base, verify=verify, timeout=10)

    async def stream(self, http: httpx.AsyncClient) -> str:
        body = {"model": "echo", "prompt": "hi", "max_tokens": 4, "stream": True}
        reply = await http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.text.rstrip().endswith("data: [DONE]"), reply.text
        return reply.text

    async def wait_streaming(self, http: httpx.AsyncClient, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while True:
            try:
                if (await http.get("/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(p.log()[-1500:] for p in self.procs)
                raise AssertionError(f"gateway not ready within {within} s\n{logs}")
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=15)


@pytest.fixture
def token_cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, {"token_file": str(tmp_path / "cluster.token")})
    try:
        yield cluster
    finally:
        cluster.stop()


def running(status: pb.StatusResponse) -> list[pb.ReplicaView]:
    return [r for r in status.replicas if r.keep and r.status.state == RUNNING]


async def wait_logged(proc: Proc, text: str, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while text not in proc.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{proc.log()[-2000:]}"
        await asyncio.sleep(0.2)


async def test_intruders_without_the_token_get_nothing(token_cluster: Cluster) -> None:
    c = token_cluster
    c.start()
    await c.wait_for("one replica running", lambda s: len(running(s)) == 1)

    # A scheduler with no token, and one with a token of its own, cannot register.
    (c.tmp / "rogue.token").write_text("r" * 43)
    anonymous = c.scheduler("evil", ["--insecure"])
    forged = c.scheduler("evil2", ["--token-file", str(c.tmp / "rogue.token")])
    await wait_logged(anonymous, "refused: no cluster token")
    await wait_logged(forged, "refused: wrong cluster token")

    # Admin calls without the token are refused; the one with it places both replicas
    # on the member node.
    async with grpc.aio.insecure_channel(c.controller) as ch:
        stub = controller_pb2_grpc.ControllerStub(ch)
        for rpc in (
            stub.Scale(pb.ScaleRequest(deployment="echo", replicas=0), timeout=3),
            stub.ApplyConfig(pb.ApplyConfigRequest(config_text="deployments: []"), timeout=3),
            stub.Status(pb.StatusRequest(), timeout=3),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rpc
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        admin = c.admin()
        await stub.Scale(
            pb.ScaleRequest(deployment="echo", replicas=2), timeout=3, metadata=admin.metadata()
        )
    status = await c.wait_for("two replicas running", lambda s: len(running(s)) == 2)
    assert {n.node.node_id for n in status.nodes} == {"good"}
    assert {r.node_id for r in status.replicas} == {"good"}

    # A replica's own port serves no one without the token.
    address = running(status)[0].status.address
    async with grpc.aio.insecure_channel(address) as ch:
        replica = replica_pb2_grpc.ReplicaStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            # No message: the refusal comes with the call's head. A message written
            # while the replica ends the call can fail the write first (INTERNAL).
            async for _ in replica.Generate(iter(()), timeout=3):
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = await replica.Health(
            replica_pb2.HealthRequest(), timeout=3, metadata=admin.metadata()
        )
        assert health.ready

    # Clients still stream through the gateway, whose calls carry the token.
    async with c.client() as http:
        await c.wait_streaming(http)
        for _ in range(4):
            await c.stream(http)
    assert anonymous.alive() and forged.alive()  # they keep knocking, and keep being refused


def make_certs(folder: Path) -> None:
    args = argparse.Namespace(out=str(folder), days=30, hosts="", new_ca=False)
    assert certs.run(args) == 0


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[Cluster]:
    make_certs(tmp_path / "tls")
    tls = str(tmp_path / "tls")
    cluster = Cluster(
        tmp_path,
        {
            "token_file": str(tmp_path / "cluster.token"),
            "tls_dir": tls,
            "https_cert_file": f"{tls}/https.crt",
            "https_key_file": f"{tls}/https.key",
        },
    )
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_the_whole_system_streams_over_mutual_tls_and_https(tls_cluster: Cluster) -> None:
    c = tls_cluster
    c.start()
    await c.wait_for("one replica running", lambda s: len(running(s)) == 1)
    async with c.client() as http:
        await c.wait_streaming(http)
        text = await c.stream(http)
        assert '"text"' in text
    # Plain HTTP to the HTTPS port is not served.
    async with httpx.AsyncClient(timeout=5) as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(f"http://127.0.0.1:{c.gateway_port}/ready")

    # A scheduler whose certificate comes from another CA never gets in, and says why.
    make_certs(c.tmp / "other")
    foreign = c.scheduler("foreign", ["--tls-dir", str(c.tmp / "other")])
    await wait_logged(foreign, "TLS handshake failed")

    # An expired certificate is refused before the process talks to anyone.
    expired = c.tmp / "expired"
    make_certs(expired)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_cert = x509.load_pem_x509_certificate((expired / "ca.crt").read_bytes())
    ca_key: Any = serialization.load_pem_private_key(
        (expired / "ca.key").read_bytes(), password=None
    )
    now = datetime.datetime.now(datetime.UTC)
    cert, key = certs.issue(ca_cert, ca_key, "scheduler", [], now, -1)
    certs.write_pair(expired, "scheduler", cert, key)
    old = c.scheduler("old", ["--tls-dir", str(expired)])
    assert old.proc.wait(30) == 2
    assert "scheduler.crt expired on" in old.log()

    status = await c.status()
    assert {n.node.node_id for n in status.nodes} == {"good"}
