"""Errors the gateway answers with, all in the error JSON shape of vLLM's OpenAI server.

Every refusal carries a status, a message that names the field and the reason,
a `type` named as vLLM's server names it (`BadRequestError`, `NotFoundError`...),
the parameter at fault, and the status again as `code`, as vLLM sends it;
optionally extra headers (`Retry-After`). `error_object` builds that shape for
every use: JSON error responses here and in the FastAPI handlers, and the error
event of a stream that fails after it started (`gateway.sse`), so clients parse
one shape. `ApiError.code` is the gateway's own short reason (`capacity`,
`no_replica`...): it goes to logs and metrics, not into the body.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel

_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    431: "RequestHeaderFieldsTooLargeError",
    500: "InternalServerError",
    501: "NotImplementedError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}
"""`type` of an error by status; vLLM's names where its server answers that status."""


QUOTE_LIMIT = 64
"""Characters of one piece of client input an error message repeats; the rest is elided."""
MESSAGE_LIMIT = 1024
"""Characters of a whole error message (and of `param`), whatever went into it."""


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text`, client input an error message repeats, cut to `limit` characters.

    Every message that repeats what a client sent (a model name, a role, a field's
    value or name, a path) passes it through here, so an error body stays small
    whatever was sent; pass `repr(value)` to quote a value as Python writes it.
    """
    if len(text) <= limit:
        return text
    return f"{text[: limit - 3]}...(+{len(text) - limit + 3} characters)"


def error_type(status: int) -> str:
    return _TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")


def error_object(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """The error body: `{"error": {message, type, param, code}}`; `ErrorBody` documents it.

    The message is bounded here too: a stream's error event carries a replica's message."""
    return {
        "error": {
            "message": quote(message, MESSAGE_LIMIT),
            "type": error_type(status),
            "param": param,
            "code": status,
        }
    }


class ErrorDetail(BaseModel):
    message: str
    type: str
    """`BadRequestError`, `NotFoundError`, `ServiceUnavailableError`... (vLLM's names)."""
    param: str | None = None
    """The request field at fault, when one is."""
    code: int
    """The HTTP status."""


class ErrorBody(BaseModel):
    """Every error response (OpenAI's shape), for the OpenAPI document; `error_object` builds it."""

    error: ErrorDetail


class ApiError(Exception):
    """A request the gateway refuses or cannot serve; becomes one JSON error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        message = quote(message, MESSAGE_LIMIT)  # bounded even where a caller forgot `quote`
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param if param is None else quote(param, MESSAGE_LIMIT)
        self.code = code
        """The gateway's short reason (`capacity`, `no_replica`...), for logs and metrics."""
        self.retry_after = retry_after
        self.extra_headers = headers or []
        """More response headers (a rate limit's `x-ratelimit-*`)."""

    @property
    def type(self) -> str:
        return error_type(self.status)

    def payload(self) -> dict[str, Any]:
        return error_object(self.message, self.status, self.param)

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", b"%d" % max(1, round(self.retry_after))))
        headers.extend(self.extra_headers)
        return headers


async def send_error(send: Any, exc: ApiError, *extra: tuple[bytes, bytes]) -> None:
    """Answer with `exc` as a whole JSON response, straight to the ASGI `send`."""
    body = exc.body()
    headers = [*exc.headers(), (b"content-length", b"%d" % len(body)), *extra]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
