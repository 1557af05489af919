"""What the gateway answers, for the OpenAPI document: response bodies and stream events.

The bodies themselves are written by `gateway.sse` and `gateway.openai_stream`
(by hand, for speed) and by the routes in `gateway.app`; these models only
describe them. They name the fields every answer carries, with their types,
and leave the rest open (vLLM's shapes carry many `null` extras), so the
document is exact about what a client can rely on. The schemathesis run in
`tests/integration/test_gateway_fuzz.py` checks every answer against them.

A stream is documented per event with OpenAPI 3.2's `itemSchema` (schemathesis
and newer tools read it; older ones see the description): an event's `data` is
JSON, a chunk or an error object, and the OpenAI routes end with `[DONE]`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from gateway.errors import ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SeedEvent(BaseModel):
    """One event of a `/v1/chat/{model}` stream: a token, or the last event (`finished`)."""

    token: str
    finished: bool
    finish_reason: str | None = None
    """On the last event: `stop`, `length`... (vLLM's names)."""
    usage: Usage | None = None
    """On the last event."""


class SeedReply(BaseModel):
    """The whole answer of `/v1/chat/{model}` when `stream` is false."""

    id: str
    model: str
    text: str
    finished: Literal[True]
    finish_reason: str | None
    usage: Usage


class ChatMessageOut(BaseModel):
    role: str
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    """A whole chat completion (`stream` false), in vLLM's shape."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    """One event of a chat completion stream."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    """On the last chunk when `stream_options.include_usage` (every chunk with
    `continuous_usage_stats`)."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class Completion(BaseModel):
    """A whole text completion (`stream` false), in vLLM's shape."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class CompletionChunk(BaseModel):
    """One event of a text completion stream (vLLM names its object `text_completion`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None
    ready_replicas: int
    """Replicas in rotation for this model now."""
    max_tokens: int
    """The largest `max_tokens` a request may ask for."""
    routing: str
    """The model's routing strategy."""


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeReply(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeReply(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    routing_table_version: int
    ready_replicas: dict[str, int] = Field(description="Ready replicas per model.")


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    SeedEvent,
    SeedReply,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ModelList,
    TokenizeReply,
    DetokenizeReply,
    Health,
    Readiness,
    ErrorBody,
)


def response_schemas() -> dict[str, Any]:
    """Component schemas of the response bodies and events, refs pointing at components."""
    schemas: dict[str, Any] = {}
    for model in RESPONSE_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def json_content(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": ref(model)}}


def event_stream(chunk: type[BaseModel], done: bool) -> dict[str, Any]:
    """The `text/event-stream` media type of a stream of `chunk` events (then `[DONE]` when
    `done`); an error after the first token is an error object's event."""
    data: dict[str, Any] = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [ref(chunk), ref(ErrorBody)]},
    }
    if done:
        data = {"type": "string", "if": {"const": "[DONE]"}, "else": data}
    return {
        "itemSchema": {
            "type": "object",
            "required": ["data"],
            "properties": {"event": {"enum": ["message", "error"]}, "data": data},
        }
    }


BEARER = "bearer"
"""The security scheme of the routes that need an API key when the gateway has some."""
SECURITY_SCHEMES = {
    BEARER: {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the gateway's API keys (`gateway.api_keys`).",
    }
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}
_ERRORS: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("Invalid request: the message names the field and the reason.", {}),
    401: ("Missing or wrong API key (when the gateway has API keys).", {}),
    404: ("Unknown model.", {}),
    413: ("Body over `gateway.max_body_bytes`.", {}),
    415: ("Unsupported content type.", {}),
    429: (
        "Rate or concurrency limit for this client or API key; see Retry-After and the "
        "x-ratelimit-* headers.",
        _RETRY_AFTER,
    ),
    503: ("At capacity, or no ready replica for the model; see Retry-After.", _RETRY_AFTER),
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses` entries for these error statuses, each an `ErrorBody`."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, headers = _ERRORS[status]
        out[status] = {"model": ErrorBody, "description": description}
        if headers:
            out[status]["headers"] = headers
    return out
