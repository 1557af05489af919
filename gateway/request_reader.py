"""Reading a generation request off HTTP: the three routes, the body and each route's parser.

Nothing here looks at the routing table: `read_body` takes the body (checking
its content type and size) and `parse_body` turns it into the model name and a
`GenerationInput` with the route's parser. Each refusal is a precise
`ApiError` (400, 413, 415) that `Gateway.serve` answers and counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from starlette.requests import ClientDisconnect

from gateway.api_models import (
    GenerationInput,
    decode_json,
    parse_seed_json,
    parse_seed_text,
)
from gateway.errors import ApiError, quote
from gateway.openai_requests import parse_chat_completion, parse_completion
from gateway.openai_stream import RichChatFormat, RichCompletionFormat
from gateway.sse import ChatFormat, CompletionFormat, SeedFormat, StreamFormat

SEED_ROUTE = "/v1/chat/{model}"
"""The model is in the path; the body is JSON, or the user's message as plain text."""
CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
_LEAN: dict[str, type[StreamFormat]] = {CHAT_ROUTE: ChatFormat, COMPLETIONS_ROUTE: CompletionFormat}
_RICH: dict[str, type[StreamFormat]] = {
    CHAT_ROUTE: RichChatFormat,
    COMPLETIONS_ROUTE: RichCompletionFormat,
}
_OPENAI_PARSERS: dict[str, Callable[[dict[str, Any], str | None], tuple[str, GenerationInput]]] = {
    CHAT_ROUTE: parse_chat_completion,
    COMPLETIONS_ROUTE: parse_completion,
}


def request_headers(scope: dict[str, Any]) -> dict[str, str]:
    """An ASGI scope's headers by (lower-case) name; of a repeated header, the first."""
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1")
        if key not in headers:
            headers[key] = value.decode("latin-1")
    return headers


async def read_body(
    headers: Mapping[str, str], receive: Any, limit: int, *, allow_text: bool
) -> tuple[bytes, bool]:
    """The body (at most `limit` bytes) off ASGI `receive` and whether it is JSON; 413/415
    otherwise, ClientDisconnect when the client leaves first."""
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if allow_text and ctype == "application/x-www-form-urlencoded":
        ctype = ""  # what `curl -d` sends by default: read the body as if untyped
    is_json = ctype == "application/json" or ctype.endswith("+json")
    if not is_json and not (allow_text and ctype == "text/plain") and ctype:
        accepted = "application/json or text/plain" if allow_text else "application/json"
        msg = f"content-type {quote(repr(ctype))} is not supported; send {accepted}"
        raise ApiError(415, msg, code="unsupported_media_type")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        msg = f"body of {quote(declared)} bytes is over the limit of {limit} bytes"
        raise ApiError(413, msg, code="body_too_large")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes", code="body_too_large")
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    if not ctype:  # no content type: JSON when it looks like it, else the prompt text
        is_json = body.lstrip()[:1] in (b"{", b"[") or not allow_text
    return body, is_json


def make_format(
    route: str, request_id: str, model: str, inp: GenerationInput, fingerprint: str
) -> StreamFormat:
    """How this request's answer is written, chosen once: a streamed OpenAI request that
    asks for nothing beyond text gets the lean format (least work per token)."""
    if route == SEED_ROUTE:
        return SeedFormat(request_id, model, inp, fingerprint)
    formats = _LEAN if inp.stream and inp.output is None else _RICH
    return formats[route](request_id, model, inp, fingerprint)


def parse_body(
    route: str, path_model: str | None, body: bytes, is_json: bool, session: str | None
) -> tuple[str, GenerationInput]:
    """The model asked for (from the path on the seed route) and what to generate; 400 if bad.

    `session` is the X-Session-Id header, the session key when the body gives none.
    """
    if route == SEED_ROUTE:
        if is_json:
            inp = parse_seed_json(decode_json(body), session)
        else:
            inp = parse_seed_text(body, session)
        return path_model or "", inp
    return _OPENAI_PARSERS[route](decode_json(body), session)
