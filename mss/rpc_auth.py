"""The gRPC side of `mss.security`: channels, ports and the servers' access check.

`channel`/`sync_channel` dial with TLS when the process has certificates
(checking the server's role name, not the address) and plain TCP otherwise;
callers add `Credentials.metadata()` to each call (call credentials would need
TLS, and the token works without it). `add_port` listens the same way, asking
clients for their certificate. `AuthInterceptor` enforces one `Rule` per
method before the handler runs: the token first, then (with TLS) the role in
the caller's certificate. A method without a rule is refused, so a new RPC is
closed until someone decides who may call it.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from mss.security import SERVER_NAMES, Credentials

log = logging.getLogger(__name__)

REFUSAL_LOG_INTERVAL_S = 10.0
"""One log line per peer and reason in this window: a scanner must not flood the log."""


@dataclass(frozen=True)
class Rule:
    """Who may call one method: certificate roles (checked under TLS); admin calls may need
    the admin token."""

    roles: frozenset[str]
    admin: bool = False


def rules(table: Mapping[str, Iterable[str]], admin: Iterable[str] = ()) -> dict[str, Rule]:
    """`{"/pkg.Service/Method": Rule}` from method names to roles; `admin` names admin calls."""
    admin_set = set(admin)
    return {name: Rule(frozenset(roles), name in admin_set) for name, roles in table.items()}


CONTROLLER_RULES = rules(
    {
        "/mss.controller.Controller/RegisterNode": ["scheduler"],
        "/mss.controller.Controller/Heartbeat": ["scheduler"],
        "/mss.controller.Controller/WatchRoutes": ["gateway", "admin"],
        "/mss.controller.Controller/ReportLoad": ["gateway"],
        "/mss.controller.Controller/Status": ["admin"],
        "/mss.controller.Controller/Scale": ["admin"],
        "/mss.controller.Controller/ApplyConfig": ["admin"],
    },
    admin=["/mss.controller.Controller/Scale", "/mss.controller.Controller/ApplyConfig"],
)
REPLICA_RULES = rules(
    {
        "/mss.replica.Replica/Generate": ["gateway"],
        "/mss.replica.Replica/Health": ["gateway", "scheduler"],
        "/mss.replica.Replica/Tokenize": ["gateway"],
        "/mss.replica.Replica/Detokenize": ["gateway"],
    }
)
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
"""Standard health checks answer anyone: probes (Kubernetes' included) carry no credentials."""


def _tls_options(server_role: str, options: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [*options, ("grpc.ssl_target_name_override", SERVER_NAMES[server_role])]


def _channel_credentials(creds: Credentials) -> grpc.ChannelCredentials:
    assert creds.tls is not None
    return grpc.ssl_channel_credentials(
        root_certificates=creds.tls.ca, private_key=creds.tls.key, certificate_chain=creds.tls.cert
    )


def channel(
    target: str, creds: Credentials, server_role: str, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    """An asyncio channel to a `server_role` ("controller" or "replica") at `target`."""
    if creds.tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(
        target, _channel_credentials(creds), options=_tls_options(server_role, options)
    )


def sync_channel(
    target: str, creds: Credentials, server_role: str, options: list[tuple[str, Any]]
) -> grpc.Channel:
    """A blocking channel, for the command-line clients."""
    if creds.tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(
        target, _channel_credentials(creds), options=_tls_options(server_role, options)
    )


def add_port(server: grpc.aio.Server, address: str, creds: Credentials) -> int:
    """Listen on `address` (TLS asking for a client certificate when `creds` has files);
    the port, or 0 when it cannot be bound."""
    try:
        if creds.tls is None:
            return server.add_insecure_port(address)
        tls = grpc.ssl_server_credentials(
            [(creds.tls.key, creds.tls.cert)],
            root_certificates=creds.tls.ca,
            require_client_auth=True,
        )
        return server.add_secure_port(address, tls)
    except RuntimeError:
        return 0


def describe(error: grpc.RpcError) -> str:
    """An RPC failure in words, saying so plainly when credentials were the cause."""
    # grpc.aio's errors and the blocking API's both have code() and details(),
    # but only the latter are grpc.Call.
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code = code_of() if callable(code_of) else None
    details = (details_of() if callable(details_of) else None) or str(error)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"refused: {details} (is the cluster token the same on both sides?)"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"refused: {details}"
    lowered = details.lower()
    # "tcp handshaker shutdown" is a connection attempt given up (the host is unreachable),
    # before any TLS.
    tls = "handshake" in lowered and "tcp handshaker" not in lowered
    if tls or "certificate" in lowered or "ssl" in lowered:
        return (
            f"TLS handshake failed: {details} (certificates from another CA, expired, "
            "or TLS on one side only?)"
        )
    name = code.name if code is not None else "error"
    if "socket closed" in lowered:  # also what a server that stopped or died leaves
        return f"{name}: {details} (the server went away, or TLS on the server and not here?)"
    return f"{name}: {details}"


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _peer_roles(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    auth = context.auth_context() or {}
    return [name.decode("latin-1") for name in auth.get("x509_common_name", [])]


Behavior = Callable[..., Any]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the token (UNAUTHENTICATED) or, under TLS, from a role the
    method's `Rule` does not admit (PERMISSION_DENIED), with one log line per peer."""

    def __init__(self, creds: Credentials, method_rules: Mapping[str, Rule]) -> None:
        self.creds = creds
        self.rules = dict(method_rules)
        self._logged: dict[tuple[str, str], float] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES) or self.creds.insecure:
            return handler
        rule = self.rules.get(method)
        if rule is None:
            return self._refusal(handler, method, grpc.StatusCode.PERMISSION_DENIED, "closed")
        if self.creds.token is not None:
            presented = _bearer(details.invocation_metadata)
            if not self.creds.token_matches(presented, admin=rule.admin):
                what = "admin token" if rule.admin and self.creds.admin_token else "cluster token"
                reason = f"{'no' if presented is None else 'wrong'} {what}"
                return self._refusal(handler, method, grpc.StatusCode.UNAUTHENTICATED, reason)
        if self.creds.tls is not None:
            return self._role_checked(handler, method, rule)
        return handler

    def _log_refusal(self, context: grpc.aio.ServicerContext[Any, Any], reason: str) -> None:
        peer = context.peer() or "unknown"
        host = peer.rsplit(":", 1)[0]
        now = time.monotonic()
        key = (host, reason)
        if now - self._logged.get(key, -REFUSAL_LOG_INTERVAL_S) < REFUSAL_LOG_INTERVAL_S:
            return
        if len(self._logged) > 1024:
            self._logged.clear()
        self._logged[key] = now
        log.warning("refused a call from %s: %s", peer, reason)

    def _refusal(
        self, handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, reason: str
    ) -> grpc.RpcMethodHandler:
        async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            self._log_refusal(context, f"{method}: {reason}")
            await context.abort(code, reason)

        return _same_kind(handler, refuse)

    def _role_checked(
        self, handler: grpc.RpcMethodHandler, method: str, rule: Rule
    ) -> grpc.RpcMethodHandler:
        behavior = _behavior(handler)
        allowed = " or ".join(sorted(rule.roles))

        async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            roles = _peer_roles(context)
            if not rule.roles.intersection(roles):
                names = ", ".join(roles) or "none"
                reason = f"{method} needs a {allowed} certificate; the caller's names {names}"
                self._log_refusal(context, reason)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)

        if inspect.isasyncgenfunction(behavior):

            async def streamed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await check(context)
                async for reply in behavior(request, context):
                    yield reply

            return _same_kind(handler, streamed)

        async def called(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            return await behavior(request, context)

        return _same_kind(handler, called)


def _behavior(handler: grpc.RpcMethodHandler) -> Behavior:
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


def _same_kind(handler: grpc.RpcMethodHandler, behavior: Behavior) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind and serializers that runs `behavior` instead."""
    serde = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(behavior, **serde)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(behavior, **serde)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(behavior, **serde)
    return grpc.stream_stream_rpc_method_handler(behavior, **serde)
