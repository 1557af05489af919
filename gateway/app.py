"""The FastAPI application: routes, request ids, errors, lifespan.

Routes parse and validate the request, then hand a raw ASGI response to
`GenerationService`, which writes SSE chunks straight to the server's `send`.
Every response carries `X-Request-Id` (the client's, when it sent a sane one);
every refusal is OpenAI-shaped JSON with a precise message, and no input can
produce a 5xx or a traceback in the response.

Assumption: `/v1/chat/completions` is matched before `/v1/chat/{model}`, so a
model named `completions` is reachable only through the OpenAI routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import http_protocol, metrics
from gateway.admission import ClientLimiter
from gateway.api_models import (
    GenerationInput,
    check_max_tokens,
    decode_json,
    openapi_schemas,
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
from mss.logs import request_id_var, setup_logging

log = logging.getLogger("gateway")

_REQUEST_ID_RE = re.compile(r"^[!-~]{1,128}$")
SEED_ROUTE = "/v1/chat/{model}"
CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
REASONS = {401: "auth", 429: "rate", 503: "capacity"}


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
        self._tasks.append(
            asyncio.create_task(self.service.watchdog(), name="slow-client-watchdog")
        )
        self._tasks.append(asyncio.create_task(self._refresh_gauges(), name="gauge-refresh"))
        if self.options.controller:
            from gateway.route_watcher import RouteWatcher

            watcher = RouteWatcher(self.options.controller, self.table.apply)
            self._tasks.append(asyncio.create_task(watcher.run(), name="route-watcher"))
            log.info("watching routes from the controller at %s", self.options.controller)
        else:
            table = static_table(self.options.replicas, self.options.config, self.options.routing)
            self.table.apply(table)

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
            raise ApiError(
                404,
                f"model {model!r} not found (known: {known})",
                param="model",
                code="model_not_found",
            )
        return router

    def check_auth(self, request: Request) -> str | None:
        """The caller's API key; raises 401 when keys are configured and it is missing or wrong."""
        if not self.api_keys:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.api_keys:
            raise ApiError(
                401,
                "missing or invalid API key (Authorization: Bearer <key>)",
                code="invalid_api_key",
            )
        return key.strip()


class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-Id when sane) and echoes it back."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                text = value.decode("latin-1")
                if _REQUEST_ID_RE.match(text):
                    rid = text
                break
        if not rid:
            rid = os.urandom(8).hex()
        scope.setdefault("state", {})["request_id"] = rid
        request_id_var.set(rid)
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _error_response(exc: ApiError) -> JSONResponse:
    headers = {k.decode(): v.decode() for k, v in exc.headers() if k != b"content-type"}
    return JSONResponse(exc.payload(), status_code=exc.status, headers=headers)


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
        try:
            status = await self.gateway.service.run(
                scope,
                receive,
                send,
                router=self.router,
                inp=self.inp,
                max_tokens=self.max_tokens,
                fmt=self.fmt,
                request_id=self.fmt.request_id,
                client_key=self.client_key,
            )
        except ApiError as exc:
            status = exc.status
            reason = REASONS.get(status)
            if reason and exc.code != "no_replica":
                metrics.REJECTIONS.labels(self.router.name, reason).inc()
            await send({"type": "http.response.start", "status": status, "headers": exc.headers()})
            await send({"type": "http.response.body", "body": exc.body()})
        metrics.REQUESTS.labels(self.router.name, self.route, str(status)).inc()


async def read_body(request: Request, limit: int, *, allow_text: bool) -> tuple[bytes, bool]:
    """The body (at most `limit` bytes) and whether it is JSON; 413/415 otherwise."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if allow_text and ctype == "application/x-www-form-urlencoded":
        ctype = ""  # what `curl -d` sends by default: read the body as if untyped
    is_json = ctype == "application/json" or ctype.endswith("+json")
    if not is_json and not (allow_text and ctype == "text/plain") and ctype:
        accepted = "application/json or text/plain" if allow_text else "application/json"
        raise ApiError(
            415,
            f"content-type {ctype!r} is not supported; send {accepted}",
            code="unsupported_media_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            f"body of {declared} bytes is over the limit of {limit} bytes",
            code="body_too_large",
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes", code="body_too_large")
    if not ctype:  # no content type: JSON when it looks like it, else the prompt text
        is_json = body.lstrip()[:1] in (b"{", b"[") or not allow_text
    return bytes(body), is_json


def _client_key(request: Request, api_key: str | None) -> str:
    if api_key:
        return f"key:{api_key}"
    return request.client.host if request.client else "unknown"


def create_app(options: GatewayOptions) -> FastAPI:
    gateway = Gateway(options)
    http_protocol.send_buffer_bytes = gateway.settings.client_send_buffer_bytes

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(
        title="mss gateway",
        version="0.1.0",
        summary="Streams tokens from LLM replicas as server-sent events; OpenAI-compatible.",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    limit = gateway.settings.max_body_bytes

    def rejected(model: str, route: str, exc: ApiError) -> ApiError:
        reason = REASONS.get(exc.status, "invalid" if exc.status < 500 else None)
        if reason:
            metrics.REJECTIONS.labels(model, reason).inc()
        metrics.REQUESTS.labels(model, route, str(exc.status)).inc()
        return exc

    async def start_generation(
        request: Request,
        route: str,
        model: str | None,
        parse: Callable[..., Any],
        fmt_cls: type[StreamFormat],
    ) -> GenerationResponse:
        label = model or ""
        try:
            api_key = gateway.check_auth(request)
            body, is_json = await read_body(request, limit, allow_text=route == SEED_ROUTE)
            session = request.headers.get("x-session-id")
            if route == SEED_ROUTE:
                assert model is not None
                router = gateway.router_for(model)
                inp = (
                    parse_seed_json(decode_json(body), session)
                    if is_json
                    else parse_seed_text(body, session)
                )
            else:
                model, inp = parse(decode_json(body), session)
                label = model or ""
                router = gateway.router_for(model or "")
            max_tokens = check_max_tokens(inp, router.max_tokens)
        except ApiError as exc:
            raise rejected(label if label in gateway.table.models else "", route, exc) from None
        rid = request.state.request_id
        fmt = fmt_cls(rid, router.name, inp.include_usage)
        return GenerationResponse(
            gateway, router, inp, max_tokens, fmt, route, _client_key(request, api_key)
        )

    error_docs: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": text}
        for status, text in (
            (400, "Invalid request"),
            (401, "Missing or wrong API key"),
            (404, "Unknown model"),
            (413, "Body too large"),
            (415, "Unsupported content type"),
            (429, "Too many concurrent requests from this client"),
            (503, "At capacity or no ready replica; see Retry-After"),
        )
    }
    sse_doc = {
        "content": {"text/event-stream": {"schema": {"type": "string"}}, "application/json": {}}
    }

    def body_doc(schema: str, text: bool = False) -> dict[str, Any]:
        content: dict[str, Any] = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}
        }
        if text:
            content["text/plain"] = {"schema": {"type": "string", "description": "the prompt"}}
        return {"requestBody": {"required": True, "content": content}}

    @app.post(
        CHAT_ROUTE,
        summary="OpenAI chat completions, streaming or not",
        responses={200: sse_doc, **error_docs},
        openapi_extra=body_doc("ChatCompletionRequest"),
    )
    async def chat_completions(request: Request) -> Response:
        return await start_generation(request, CHAT_ROUTE, None, parse_chat_completion, ChatFormat)

    @app.post(
        COMPLETIONS_ROUTE,
        summary="OpenAI text completions, streaming or not",
        responses={200: sse_doc, **error_docs},
        openapi_extra=body_doc("CompletionRequest"),
    )
    async def completions(request: Request) -> Response:
        return await start_generation(
            request, COMPLETIONS_ROUTE, None, parse_completion, CompletionFormat
        )

    @app.post(
        SEED_ROUTE,
        summary="Stream a reply as SSE events {token, finished}; JSON body or text/plain prompt",
        responses={200: sse_doc, **error_docs},
        openapi_extra=body_doc("SeedChatRequest", text=True),
    )
    async def chat(model: str, request: Request) -> Response:
        return await start_generation(request, SEED_ROUTE, model, parse_seed_json, SeedFormat)

    @app.get("/v1/models", summary="Models this gateway routes")
    async def list_models(request: Request) -> JSONResponse:
        gateway.check_auth(request)
        data = [
            {"id": name, "object": "model", "created": gateway.started, "owned_by": "mss"}
            for name in sorted(gateway.table.models)
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health", summary="The process is alive")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready", summary="200 when some model has a ready replica, else 503")
    async def ready() -> JSONResponse:
        table = gateway.table
        models = {
            name: sum(1 for s in router.candidates if s.healthy and not s.removed)
            for name, router in table.models.items()
        }
        ok = table.ready()
        return JSONResponse(
            {"ready": ok, "routing_table_version": table.version, "ready_replicas": models},
            status_code=200 if ok else 503,
            headers=None if ok else {"retry-after": "1"},
        )

    @app.get("/metrics", summary="Prometheus metrics of the whole gateway")
    async def metrics_endpoint() -> Response:
        gateway.table.refresh_gauges()
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {
            404: f"no route {request.url.path}",
            405: f"method {request.method} not allowed on {request.url.path}",
        }
        err = ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
        response = _error_response(err)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return _error_response(ApiError(400, f"{where}: {first.get('msg')}", param=where))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error handling %s %s", request.method, request.url.path)
        return _error_response(
            ApiError(500, "internal error; see the gateway log", code="internal")
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_schemas())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(RequestIdMiddleware)
    return app


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error response (OpenAI's shape)."""

    error: ErrorDetail


OPTIONS_ENV = "MSS_GATEWAY_OPTIONS"


def options_to_json(options: GatewayOptions) -> str:
    import orjson

    return orjson.dumps(
        {
            "config": options.config.model_dump(mode="json"),
            "replicas": options.replicas,
            "controller": options.controller,
            "routing": options.routing,
            "workers": options.workers,
            "replica_streams": options.replica_streams,
            "log_format": options.log_format,
            "log_level": options.log_level,
        }
    ).decode()


def options_from_json(text: str) -> GatewayOptions:
    import orjson

    raw = orjson.loads(text)
    return GatewayOptions(
        config=ClusterConfig.model_validate(raw["config"]),
        replicas=[(m, a) for m, a in raw["replicas"]],
        controller=raw["controller"],
        routing=raw["routing"],
        workers=raw["workers"],
        replica_streams=raw["replica_streams"],
        log_format=raw["log_format"],
        log_level=raw["log_level"],
    )


def app_from_environment() -> FastAPI:
    """Factory for uvicorn worker processes: options travel in MSS_GATEWAY_OPTIONS."""
    options = options_from_json(os.environ[OPTIONS_ENV])
    setup_logging("gateway", options.log_format, options.log_level)
    return create_app(options)
