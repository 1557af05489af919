"""The gateway's state and the front half of every generation request.

`Gateway` holds what one gateway process serves from (routing table,
generation service, settings) and turns an HTTP request into a
`GenerationResponse`: API key, content type, body size, parsing, model
lookup and max_tokens bounds, each refusal a precise `ApiError`. The response
is a raw ASGI callable: `GenerationService` writes SSE chunks to `send` itself.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway import metrics
from gateway.admission import ClientLimiter
from gateway.api_models import (
    GenerationInput,
    check_max_tokens,
    decode_json,
    parse_chat_completion,
    parse_completion,
    parse_seed_json,
    parse_seed_text,
)
from gateway.errors import ApiError
from gateway.generation import GenerationService
from gateway.routing_table import ModelRouter, RoutingTable, static_table
from gateway.sse import ChatFormat, CompletionFormat, SeedFormat, StreamFormat
from mss.config import ClusterConfig, GatewaySettings

log = logging.getLogger("gateway")

SEED_ROUTE = "/v1/chat/{model}"
CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
REASONS = {401: "auth", 429: "rate", 503: "capacity"}
GC_YOUNG_THRESHOLD = 10_000
_FORMATS: dict[str, type[StreamFormat]] = {
    SEED_ROUTE: SeedFormat,
    CHAT_ROUTE: ChatFormat,
    COMPLETIONS_ROUTE: CompletionFormat,
}
_PARSERS: dict[str, Callable[[dict[str, Any], str | None], tuple[str, GenerationInput]]] = {
    CHAT_ROUTE: parse_chat_completion,
    COMPLETIONS_ROUTE: parse_completion,
}


@dataclass
class GatewayOptions:
    """Everything a gateway process needs; JSON-serialisable for worker processes."""

    config: ClusterConfig = field(default_factory=ClusterConfig)
    replicas: list[tuple[str, str]] = field(default_factory=list)
    """Static routes, (model, host:port), used when no controller is given."""
    controller: str | None = None
    routing: str | None = None
    """Strategy for every model of the static table, overriding the config."""
    workers: int = 1
    replica_streams: int = 1
    log_format: str = "text"
    log_level: str = "INFO"

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "config": self.config.model_dump(mode="json"),
                "replicas": self.replicas,
                "controller": self.controller,
                "routing": self.routing,
                "workers": self.workers,
                "replica_streams": self.replica_streams,
                "log_format": self.log_format,
                "log_level": self.log_level,
            }
        ).decode()

    @classmethod
    def from_json(cls, text: str) -> GatewayOptions:
        raw = orjson.loads(text)
        raw["config"] = ClusterConfig.model_validate(raw["config"])
        raw["replicas"] = [(m, a) for m, a in raw["replicas"]]
        return cls(**raw)


async def read_body(request: Request, limit: int, *, allow_text: bool) -> tuple[bytes, bool]:
    """The body (at most `limit` bytes) and whether it is JSON; 413/415 otherwise."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if allow_text and ctype == "application/x-www-form-urlencoded":
        ctype = ""  # what `curl -d` sends by default: read the body as if untyped
    is_json = ctype == "application/json" or ctype.endswith("+json")
    if not is_json and not (allow_text and ctype == "text/plain") and ctype:
        accepted = "application/json or text/plain" if allow_text else "application/json"
        msg = f"content-type {ctype!r} is not supported; send {accepted}"
        raise ApiError(415, msg, code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        msg = f"body of {declared} bytes is over the limit of {limit} bytes"
        raise ApiError(413, msg, code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes", code="body_too_large")
    if not ctype:  # no content type: JSON when it looks like it, else the prompt text
        is_json = body.lstrip()[:1] in (b"{", b"[") or not allow_text
    return bytes(body), is_json


class GenerationResponse(Response):
    """A raw ASGI response: the generation writes to `send` itself."""

    def __init__(
        self,
        gateway: Gateway,
        router: ModelRouter,
        inp: GenerationInput,
        max_tokens: int,
        fmt: StreamFormat,
        route: str,
        client_key: str,
    ) -> None:
        self.gateway = gateway
        self.router = router
        self.inp = inp
        self.max_tokens = max_tokens
        self.fmt = fmt
        self.route = route
        self.client_key = client_key
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        rid_header = (b"x-request-id", self.fmt.request_id.encode())
        try:
            status = await self.gateway.service.run(
                scope,
                receive,
                send,
                router=self.router,
                inp=self.inp,
                max_tokens=self.max_tokens,
                fmt=self.fmt,
                headers=[rid_header],
                client_key=self.client_key,
            )
        except ApiError as exc:
            status = exc.status
            reason = REASONS.get(status)
            if reason and exc.code != "no_replica":
                metrics.REJECTIONS.labels(self.router.name, reason).inc()
            await send_error(send, exc, rid_header)
        metrics.count_request(self.router.name, self.route, status)
        log.debug("%s %s answered %d", self.route, self.router.name, status)


async def send_error(send: Any, exc: ApiError, *extra: tuple[bytes, bytes]) -> None:
    body = exc.body()
    headers = [*exc.headers(), (b"content-length", b"%d" % len(body)), *extra]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """The state one gateway process serves from."""

    def __init__(self, options: GatewayOptions) -> None:
        self.options = options
        self.settings: GatewaySettings = options.config.gateway
        self.table = RoutingTable(
            workers=options.workers,
            replica_streams=options.replica_streams,
            failure_threshold=self.settings.replica_failure_threshold,
        )
        self.service = GenerationService(
            retries=self.settings.retries,
            buffer_chunks=self.settings.stream_buffer_chunks,
            slow_client_timeout_s=self.settings.slow_client_timeout_s,
            limiter=ClientLimiter(self.settings.max_in_flight_per_client),
        )
        self.api_keys = frozenset(self.settings.api_keys)
        self.started = int(time.time())
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        tasks = self._tasks
        tasks.append(asyncio.create_task(self.service.watchdog(), name="slow-client-watchdog"))
        tasks.append(asyncio.create_task(self._refresh_gauges(), name="gauge-refresh"))
        if self.options.controller:
            from gateway.route_watcher import RouteWatcher

            watcher = RouteWatcher(self.options.controller, self.table.apply)
            tasks.append(asyncio.create_task(watcher.run(), name="route-watcher"))
            log.info("watching routes from the controller at %s", self.options.controller)
        else:
            table = static_table(self.options.replicas, self.options.config, self.options.routing)
            self.table.apply(table)
        # What exists now lives as long as the process: keep it out of every collection,
        # and collect the young generation less often (per-token objects die young, by
        # reference counting; a collection pass stalls every stream for milliseconds).
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.table.close()

    async def _refresh_gauges(self) -> None:
        while True:
            self.table.refresh_gauges()
            await asyncio.sleep(1.0)

    def router_for(self, model: str) -> ModelRouter:
        router = self.table.get(model)
        if router is None:
            known = ", ".join(sorted(self.table.models)) or "none"
            msg = f"model {model!r} not found (known: {known})"
            raise ApiError(404, msg, param="model", code="model_not_found")
        return router

    def check_auth(self, request: Request) -> str | None:
        """The caller's API key; raises 401 when keys are configured and it is missing or wrong."""
        if not self.api_keys:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.api_keys:
            msg = "missing or invalid API key (Authorization: Bearer <key>)"
            raise ApiError(401, msg, code="invalid_api_key")
        return key.strip()

    async def start_generation(
        self, request: Request, route: str, model: str | None = None
    ) -> GenerationResponse:
        """Validate a generation request; raises ApiError (counted) when it is refused."""
        label = model or ""
        try:
            api_key = self.check_auth(request)
            limit = self.settings.max_body_bytes
            body, is_json = await read_body(request, limit, allow_text=route == SEED_ROUTE)
            session = request.headers.get("x-session-id")
            if route == SEED_ROUTE:
                router = self.router_for(label)
                if is_json:
                    inp = parse_seed_json(decode_json(body), session)
                else:
                    inp = parse_seed_text(body, session)
            else:
                label, inp = _PARSERS[route](decode_json(body), session)
                router = self.router_for(label)
            max_tokens = check_max_tokens(inp, router.max_tokens)
        except ApiError as exc:
            model_label = label if label in self.table.models else ""
            reason = REASONS.get(exc.status, "invalid")
            metrics.REJECTIONS.labels(model_label, reason).inc()
            metrics.count_request(model_label, route, exc.status)
            raise
        rid = getattr(request.state, "request_id", None) or os.urandom(8).hex()
        fmt = _FORMATS[route](rid, router.name, inp.include_usage)
        if api_key:
            client_key = f"key:{api_key}"
        else:
            client_key = request.client.host if request.client else "unknown"
        return GenerationResponse(self, router, inp, max_tokens, fmt, route, client_key)
