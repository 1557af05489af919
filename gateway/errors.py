"""Errors the gateway answers with, all in OpenAI's error JSON shape.

Every refusal carries a status, a message that names the field and the reason,
an OpenAI `type`, and optionally the parameter at fault and extra headers
(`Retry-After`). The same body is used on every route so clients parse one shape.
"""

from __future__ import annotations

import orjson

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

    def payload(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", b"%d" % max(1, round(self.retry_after))))
        return headers


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    """The JSON body of an error without raising one (exception handlers, 404/405)."""
    return ApiError(status, message, code=code).body()
