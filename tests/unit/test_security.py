"""Cluster credentials: the token file, certificate checks, `mss certs`, and the gRPC access check.

The access check runs on a real in-process gRPC server (the Replica service
with a small servicer) over loopback, with and without mutual TLS.
"""

from __future__ import annotations

import argparse
import datetime
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from mss import certs
from mss.config import ConfigError, SecuritySettings
from mss.rpc_auth import REPLICA_RULES, AuthInterceptor, add_port, channel, describe, rules
from mss.security import (
    Credentials,
    SecurityError,
    credentials_from,
    load_credentials,
    load_tls,
    read_or_create_token,
)
from protos import replica_pb2, replica_pb2_grpc

NOW = datetime.datetime.now(datetime.UTC)


def make_certs(folder: Path, *extra: str) -> None:
    args = argparse.Namespace(out=str(folder), days=30, hosts=",".join(extra), new_ca=False)
    assert certs.run(args) == 0


def test_token_file_is_made_once_private_and_random(tmp_path: Path) -> None:
    path = tmp_path / "cluster.token"
    token = read_or_create_token(path)
    assert len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_or_create_token(path) == token
    assert read_or_create_token(tmp_path / "other.token") != token


def test_a_short_token_or_a_missing_file_is_refused_with_the_path(tmp_path: Path) -> None:
    short = tmp_path / "short.token"
    short.write_text("secret\n")
    with pytest.raises(SecurityError, match="at least 32 characters"):
        load_credentials(SecuritySettings(token_file=str(short)), "gateway")
    missing = tmp_path / "missing.token"
    with pytest.raises(SecurityError, match=str(missing)):
        load_credentials(SecuritySettings(token_file=str(missing)), "admin", create=False)
    assert not missing.exists()


def test_tokens_are_compared_whole_and_admin_calls_take_the_admin_token(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text("a" * 40)
    settings = SecuritySettings(
        token_file=str(tmp_path / "cluster.token"), admin_token_file=str(tmp_path / "admin.token")
    )
    creds = load_credentials(settings, "controller")
    assert creds.token is not None
    assert creds.token_matches(creds.token)
    assert not creds.token_matches(creds.token[:-1])
    assert not creds.token_matches(None)
    assert creds.token_matches("a" * 40, admin=True)
    assert not creds.token_matches(creds.token, admin=True)
    assert creds.metadata(admin=True) == (("authorization", "Bearer " + "a" * 40),)
    assert creds.metadata() == (("authorization", f"Bearer {creds.token}"),)


def test_flags_override_the_config_and_insecure_turns_everything_off(tmp_path: Path) -> None:
    args = argparse.Namespace(token_file=None, admin_token_file=None, tls_dir=None, insecure=True)
    creds = credentials_from(args, SecuritySettings(), "scheduler")
    assert creds.insecure and creds.metadata() == ()
    assert creds.child_arguments() == ["--insecure"]
    args.tls_dir = str(tmp_path)
    with pytest.raises(ConfigError, match="pick one"):
        credentials_from(args, SecuritySettings(), "scheduler")


def test_certs_writes_private_files_and_reissues_from_the_same_ca(tmp_path: Path) -> None:
    make_certs(tmp_path, "node1", "10.0.0.5")
    names = {p.name for p in tmp_path.iterdir()}
    for stem in ("ca", "controller", "scheduler", "replica", "gateway", "admin", "https"):
        assert {f"{stem}.crt", f"{stem}.key"} <= names
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tmp_path.iterdir())
    ca = (tmp_path / "ca.crt").read_bytes()
    first = (tmp_path / "gateway.crt").read_bytes()
    make_certs(tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert (tmp_path / "gateway.crt").read_bytes() != first
    tls = load_tls(str(tmp_path), "replica")
    assert tls.ca == ca


def _replace(folder: Path, role: str, days: int, ca_folder: Path | None = None) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    source = ca_folder or folder
    ca_cert = x509.load_pem_x509_certificate((source / "ca.crt").read_bytes())
    ca_key: Any = serialization.load_pem_private_key(
        (source / "ca.key").read_bytes(), password=None
    )
    cert, key = certs.issue(ca_cert, ca_key, role, [], NOW, days)
    certs.write_pair(folder, role, cert, key)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("expired", "scheduler.crt expired on"),
        ("other_ca", "is not signed by the CA"),
        ("wrong_role", "must have CN=scheduler"),
        ("wrong_key", "is not the key of"),
        ("missing", "cannot read"),
    ],
)
def test_bad_certificates_are_refused_at_start_with_the_file_and_the_reason(
    tmp_path: Path, damage: str, message: str
) -> None:
    make_certs(tmp_path / "tls")
    folder = tmp_path / "tls"
    if damage == "expired":
        _replace(folder, "scheduler", -1)
    elif damage == "other_ca":
        make_certs(tmp_path / "other")
        _replace(folder, "scheduler", 30, ca_folder=tmp_path / "other")
    elif damage == "wrong_role":
        (folder / "scheduler.crt").write_bytes((folder / "gateway.crt").read_bytes())
        (folder / "scheduler.key").write_bytes((folder / "gateway.key").read_bytes())
    elif damage == "wrong_key":
        (folder / "scheduler.key").write_bytes((folder / "gateway.key").read_bytes())
    else:
        (folder / "scheduler.key").unlink()
    with pytest.raises(SecurityError, match=message):
        load_tls(str(folder), "scheduler")


# ----- the access check on a real gRPC server ---------------------------------------------


class Servicer(replica_pb2_grpc.ReplicaServicer):
    async def Health(self, request: Any, context: Any) -> replica_pb2.HealthResponse:
        return replica_pb2.HealthResponse(ready=True)

    async def Generate(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[replica_pb2.GenerateReply]:
        async for _ in requests:
            yield replica_pb2.GenerateReply()
            return

    async def Tokenize(self, request: Any, context: Any) -> replica_pb2.TokenizeResponse:
        return replica_pb2.TokenizeResponse(tokens=[1])


async def serve(creds: Credentials, method_rules: Any = REPLICA_RULES) -> tuple[Any, str]:
    server = grpc.aio.server(interceptors=[AuthInterceptor(creds, method_rules)])
    replica_pb2_grpc.add_ReplicaServicer_to_server(Servicer(), server)
    port = add_port(server, "127.0.0.1:0", creds)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def call(
    address: str, creds: Credentials, method: str, admin: bool = False
) -> grpc.StatusCode:
    metadata = creds.metadata(admin=admin)
    async with channel(address, creds, "replica", []) as ch:
        stub = replica_pb2_grpc.ReplicaStub(ch)
        try:
            if method == "Generate":
                messages = [replica_pb2.GenerateClientMessage()]
                async for _ in stub.Generate(iter(messages), metadata=metadata, timeout=5):
                    pass
            elif method == "Health":
                await stub.Health(replica_pb2.HealthRequest(), metadata=metadata, timeout=5)
            else:
                await stub.Tokenize(
                    replica_pb2.TokenizeRequest(prompt="x"), metadata=metadata, timeout=5
                )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_token_is_required_on_every_call_kind(tmp_path: Path) -> None:
    settings = SecuritySettings(token_file=str(tmp_path / "cluster.token"))
    server_creds = load_credentials(settings, "replica")
    server, address = await serve(server_creds)
    try:
        gateway = load_credentials(settings, "gateway")
        stranger = Credentials(role="gateway")
        (tmp_path / "wrong.token").write_text("w" * 43)
        wrong = load_credentials(SecuritySettings(token_file=str(tmp_path / "wrong.token")), "x")
        for method in ("Generate", "Health", "Tokenize"):
            assert await call(address, gateway, method) == grpc.StatusCode.OK
            assert await call(address, stranger, method) == grpc.StatusCode.UNAUTHENTICATED
            assert await call(address, wrong, method) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(None)


async def test_a_method_without_a_rule_is_closed(tmp_path: Path) -> None:
    settings = SecuritySettings(token_file=str(tmp_path / "cluster.token"))
    only_health = rules({"/mss.replica.Replica/Health": ["gateway"]})
    server, address = await serve(load_credentials(settings, "replica"), only_health)
    try:
        gateway = load_credentials(settings, "gateway")
        assert await call(address, gateway, "Health") == grpc.StatusCode.OK
        assert await call(address, gateway, "Tokenize") == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(None)


async def test_admin_calls_need_the_admin_token_when_there_is_one(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text("a" * 43)
    settings = SecuritySettings(
        token_file=str(tmp_path / "cluster.token"), admin_token_file=str(tmp_path / "admin.token")
    )
    table = rules(
        {"/mss.replica.Replica/Health": ["gateway"], "/mss.replica.Replica/Tokenize": ["admin"]},
        admin=["/mss.replica.Replica/Tokenize"],
    )
    server, address = await serve(load_credentials(settings, "controller"), table)
    try:
        member = load_credentials(SecuritySettings(token_file=settings.token_file), "scheduler")
        admin = load_credentials(settings, "admin")
        assert await call(address, member, "Health") == grpc.StatusCode.OK
        assert await call(address, member, "Tokenize") == grpc.StatusCode.UNAUTHENTICATED
        assert await call(address, admin, "Tokenize", admin=True) == grpc.StatusCode.OK
    finally:
        await server.stop(None)


async def test_mutual_tls_admits_callers_by_the_role_in_their_certificate(tmp_path: Path) -> None:
    make_certs(tmp_path / "tls")
    make_certs(tmp_path / "other")
    settings = SecuritySettings(
        token_file=str(tmp_path / "cluster.token"), tls_dir=str(tmp_path / "tls")
    )
    server, address = await serve(load_credentials(settings, "replica"))
    try:
        gateway = load_credentials(settings, "gateway")
        scheduler = load_credentials(settings, "scheduler")
        assert await call(address, gateway, "Generate") == grpc.StatusCode.OK
        assert await call(address, scheduler, "Health") == grpc.StatusCode.OK
        assert await call(address, scheduler, "Generate") == grpc.StatusCode.PERMISSION_DENIED
        assert await call(address, scheduler, "Tokenize") == grpc.StatusCode.PERMISSION_DENIED
        # A certificate from another CA never completes the handshake; neither does plain TCP.
        foreign = load_credentials(
            settings.model_copy(update={"tls_dir": str(tmp_path / "other")}), "gateway"
        )
        assert await call(address, foreign, "Health") == grpc.StatusCode.UNAVAILABLE
        plain = Credentials(role="gateway", token=gateway.token)
        assert await call(address, plain, "Health") == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


class _Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_failure_is_blamed_on_tls_only_when_tls_may_be_the_cause() -> None:
    unreachable = _Failure(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: "
        "ipv4:10.0.0.2:50100: tcp handshaker shutdown",
    )
    assert "TLS" not in describe(unreachable)  # a host cut off, before any TLS
    foreign = _Failure(grpc.StatusCode.UNAVAILABLE, "Ssl handshake failed: CERTIFICATE_VERIFY")
    assert describe(foreign).startswith("TLS handshake failed")
    gone = describe(_Failure(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)"))
    assert "the server went away" in gone
