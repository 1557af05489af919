"""The ASGI application: FastAPI routes and documents, and a thin dispatcher in front.

`create_app` returns a `GatewayApp`, the callable uvicorn runs. It gives every
request an id (the client's X-Request-Id when sane, echoed on the response)
and dispatches POSTs to the three generation routes straight to
`Gateway.serve`, ahead of FastAPI's middleware stack: a streamed token then
crosses no wrapper between the generation loop and the server's `send` (each
wrapper costs on every chunk of every stream). Everything else, and the
OpenAPI document that describes all routes, is FastAPI's. The FastAPI routes
for generation hand over to the same `Gateway.serve`, so the app also works
mounted without the dispatcher. `/v1/models`, `/tokenize` and `/detokenize`
(answered by a ready replica through unary RPCs) are plain FastAPI routes.

Every refusal is JSON in the error shape of vLLM's server with a precise
message; no input produces a 5xx or a traceback in the response.

Assumption: `/v1/chat/completions` is matched before `/v1/chat/{model}`, so a
model named `completions` is reachable only through the OpenAI routes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gateway import metrics, tokenize_api
from gateway.api_models import decode_json, openapi_schemas
from gateway.api_responses import (
    BEARER,
    SECURITY_SCHEMES,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    DetokenizeReply,
    Health,
    ModelList,
    Readiness,
    SeedEvent,
    SeedReply,
    TokenizeReply,
    error_responses,
    event_stream,
    json_content,
    response_schemas,
)
from gateway.errors import ApiError, quote
from gateway.gateway import Gateway, GatewayOptions
from gateway.request_reader import CHAT_ROUTE, COMPLETIONS_ROUTE, SEED_ROUTE, read_body
from mss.logs import request_id_var

log = logging.getLogger("gateway")

_REQUEST_ID_RE = re.compile(r"^[!-~]{1,128}$")
_SEED_PREFIX = "/v1/chat/"


def _request_id(scope: dict[str, Any]) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID_RE.match(text):
                return text
            break
    return os.urandom(8).hex()


class GatewayApp:
    """What uvicorn runs: request ids, the generation fast path, FastAPI for the rest."""

    def __init__(self, gateway: Gateway, api: FastAPI) -> None:
        self.gateway = gateway
        self.api = api

    def _generation_route(self, path: str) -> tuple[str, str | None] | None:
        if path == CHAT_ROUTE:
            return CHAT_ROUTE, None
        if path == COMPLETIONS_ROUTE:
            return COMPLETIONS_ROUTE, None
        if path.startswith(_SEED_PREFIX):
            model = path[len(_SEED_PREFIX) :]
            if model and "/" not in model:
                return SEED_ROUTE, model
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        request_id_var.set(rid)
        route = self._generation_route(scope["path"]) if scope["method"] == "POST" else None
        if route is not None:
            await self.gateway.serve(scope, receive, send, *route)
            return
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await self.api(scope, receive, send_with_id)


class _Generation(Response):
    """What FastAPI's generation routes return: the ASGI call goes to `Gateway.serve`."""

    def __init__(self, gateway: Gateway, route: str, model: str | None = None) -> None:
        self.gateway = gateway
        self.route = route
        self.model = model
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.gateway.serve(scope, receive, send, self.route, self.model)


def _error_response(exc: ApiError) -> JSONResponse:
    headers = {k.decode(): v.decode() for k, v in exc.headers() if k != b"content-type"}
    return JSONResponse(exc.payload(), status_code=exc.status, headers=headers)


def create_api(gateway: Gateway) -> FastAPI:
    """The FastAPI application: every route, its documentation and error handlers."""

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
        # A trailing slash is another path (404), never a redirect: Starlette builds the
        # redirect's Location from the client's Host header.
        redirect_slashes=False,
    )
    app.state.gateway = gateway
    # The routes `check_auth` guards; they need a key only when the gateway has keys.
    secured: dict[str, Any] = {"security": [{BEARER: []}]} if gateway.keys.enabled else {}
    model_errors = error_responses(400, 401, 404, 413, 415, 429, 503)  # routes naming a model

    def generation_doc(
        reply: type[BaseModel], chunk: type[BaseModel], done: bool
    ) -> dict[int | str, dict[str, Any]]:
        end = (
            "then `data: [DONE]`; an error after the first token is an error object's event"
            if done
            else "the last with `finished` true; an error after the first token is an "
            "`event: error` holding an error object"
        )
        ok = {
            "description": "One JSON body, or (`stream` true) server-sent events, one per "
            f"chunk, `data:` holding its JSON: {end}.",
            "content": {**json_content(reply), "text/event-stream": event_stream(chunk, done)},
        }
        return {200: ok, **model_errors}

    def body_doc(schema: str, text: bool = False) -> dict[str, Any]:
        ref = {"$ref": f"#/components/schemas/{schema}"}
        content: dict[str, Any] = {"application/json": {"schema": ref}}
        if text:
            text_schema = {
                "type": "string",
                "pattern": r"\S",
                "description": "the user's message, not blank",
            }
            content["text/plain"] = {"schema": text_schema}
        return {"requestBody": {"required": True, "content": content}, **secured}

    @app.post(
        CHAT_ROUTE,
        summary="OpenAI chat completions, streaming or not",
        responses=generation_doc(ChatCompletion, ChatCompletionChunk, True),
        openapi_extra=body_doc("ChatCompletionRequest"),
        response_class=Response,
    )
    async def chat_completions() -> Any:
        return _Generation(gateway, CHAT_ROUTE)

    @app.post(
        COMPLETIONS_ROUTE,
        summary="OpenAI text completions, streaming or not",
        responses=generation_doc(Completion, CompletionChunk, True),
        openapi_extra=body_doc("CompletionRequest"),
        response_class=Response,
    )
    async def completions() -> Any:
        return _Generation(gateway, COMPLETIONS_ROUTE)

    @app.post(
        SEED_ROUTE,
        summary="Stream a reply as SSE events {token, finished}; JSON body or text/plain message",
        responses=generation_doc(SeedReply, SeedEvent, False),
        openapi_extra=body_doc("SeedChatRequest", text=True),
        response_class=Response,
    )
    async def chat(model: str) -> Any:
        return _Generation(gateway, SEED_ROUTE, model)

    @app.get(
        "/v1/models",
        summary="Models this gateway routes (vLLM's model cards)",
        responses={200: {"model": ModelList}, **error_responses(401, 429)},
        openapi_extra=secured,
    )
    async def list_models(request: Request) -> JSONResponse:
        gateway.check_auth(request.headers)
        data = []
        for name in sorted(gateway.table.models):
            router = gateway.table.models[name]
            ready = sum(1 for s in router.candidates if s.healthy and not s.removed)
            card: dict[str, Any] = {
                "id": name,
                "object": "model",
                "created": gateway.started,
                "owned_by": "mss",
                "root": name,
                "parent": None,
                "max_model_len": router.max_model_len(),
                "permission": [
                    {
                        "id": f"modelperm-{name}",
                        "object": "model_permission",
                        "created": gateway.started,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
                "ready_replicas": ready,
                "max_tokens": router.max_tokens,
                "routing": router.strategy_name,
            }
            if router.autoscaled:  # requests are held while a replica starts
                card["autoscaled"] = True
                card["scaled_to_zero"] = ready == 0
            data.append(card)
        return JSONResponse({"object": "list", "data": data})

    async def _json_body(request: Request) -> dict[str, Any]:
        body, _ = await read_body(
            request.headers, request.receive, gateway.settings.max_body_bytes, allow_text=False
        )
        return decode_json(body)

    @app.post(
        "/tokenize",
        summary="Token ids of a prompt or of chat messages rendered with the chat template",
        responses={200: {"model": TokenizeReply}, **model_errors},
        openapi_extra={
            **secured,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                {"$ref": "#/components/schemas/TokenizeCompletionRequest"},
                                {"$ref": "#/components/schemas/TokenizeChatRequest"},
                            ]
                        }
                    }
                },
            },
        },
    )
    async def tokenize(request: Request) -> JSONResponse:
        gateway.check_auth(request.headers)
        model, req = tokenize_api.tokenize_request(await _json_body(request))
        router = gateway.router_for(model)
        return JSONResponse(await tokenize_api.tokenize(router, req))

    @app.post(
        "/detokenize",
        summary="The text of token ids",
        responses={200: {"model": DetokenizeReply}, **model_errors},
        openapi_extra=body_doc("DetokenizeRequest"),
    )
    async def detokenize(request: Request) -> JSONResponse:
        gateway.check_auth(request.headers)
        model, req = tokenize_api.detokenize_request(await _json_body(request))
        router = gateway.router_for(model)
        return JSONResponse(await tokenize_api.detokenize(router, req))

    @app.get("/health", summary="The process is alive", responses={200: {"model": Health}})
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get(
        "/ready",
        summary="200 when some model has a ready replica or is autoscaled (starts one on "
        "demand), else 503",
        responses={
            200: {"model": Readiness},
            503: {"model": Readiness, "description": "No model can serve now."},
        },
    )
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

    @app.get(
        "/metrics",
        summary="Prometheus metrics of the whole gateway",
        response_class=PlainTextResponse,
        responses={
            200: {
                "description": "Prometheus text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics_endpoint() -> Response:
        gateway.table.refresh_gauges()
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = quote(request.url.path)
        method = quote(request.method)
        message = {404: f"no route {path}", 405: f"method {method} not allowed on {path}"}
        response = _error_response(
            ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
        )
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = quote(".".join(str(p) for p in first.get("loc", ())) or "request")
        return _error_response(ApiError(400, f"{where}: {first.get('msg')}", param=where))

    @app.exception_handler(ClientDisconnect)
    async def on_client_disconnect(request: Request, exc: ClientDisconnect) -> Response:
        path = quote(repr(request.url.path))
        log.info("client left before sending its whole request to %s", path)
        return Response(status_code=499)  # goes nowhere: the connection is closed

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
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            schemas.update(openapi_schemas())
            schemas.update(response_schemas())
            components["securitySchemes"] = SECURITY_SCHEMES
            # Bad input is a 400 (`on_validation_error`), never FastAPI's 422.
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def create_app(options: GatewayOptions) -> GatewayApp:
    """The gateway's ASGI app for one process."""
    gateway = Gateway(options)
    return GatewayApp(gateway, create_api(gateway))
