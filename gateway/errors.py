"""Errors the gateway answers with, all in OpenAI's error JSON shape.

Every refusal carries a status, a message that names the field and the reason,
an OpenAI `type`, and optionally the parameter at fault and extra headers
(`Retry-After`). `error_object` builds that shape for every use: JSON error
responses here and in the FastAPI handlers, and the `event: error` of a stream
that fails after it started (`gateway.sse`), so clients parse one shape.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel

_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_object(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body: `{"error": {message, type, param, code}}`; `ErrorBody` documents it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error")

    def payload(self) -> dict[str, Any]:
        return error_object(self.message, self.type, self.param, self.code)

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", b"%d" % max(1, round(self.retry_after))))
        return headers


async def send_error(send: Any, exc: ApiError, *extra: tuple[bytes, bytes]) -> None:
    """Answer with `exc` as a whole JSON response, straight to the ASGI `send`."""
    body = exc.body()
    headers = [*exc.headers(), (b"content-length", b"%d" % len(body)), *extra]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
