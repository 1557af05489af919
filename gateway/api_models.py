"""Request bodies the gateway accepts, validated once and turned into one plain record.

The same pydantic models validate the bodies and describe them in the OpenAPI
document, so the document says exactly what the routes accept. Validation is
strict (no string-to-number coercion, booleans are not numbers) and every
refusal names the field, the reason and the value given.

Assumptions: the seed route `/v1/chat/{model}` refuses unknown fields; the
OpenAI routes ignore fields they do not use (clients send many defaults) but
refuse settings they cannot honour (`n` above 1, `echo`, `logprobs`...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ApiError

MAX_STOP = 16


class TextPart(BaseModel):
    """One text part of a message's content (OpenAI's list form)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; `developer` is read as `system`."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False
    """Send a last chunk with the token counts before `[DONE]`."""


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True)
    max_tokens: int | None = Field(None, ge=1, le=1_048_576)
    """Most tokens to generate; at most the model's configured limit (its default too)."""
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = Field(None)
    """Up to 16 strings that end the output when generated."""
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)


class SeedChatRequest(_Sampling):
    """Body of `POST /v1/chat/{model}` when sent as JSON (text/plain bodies are the prompt)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=4096)
    prompt: str | None = Field(None, min_length=1)
    stream: bool = True
    """Server-sent events unless false."""
    session_id: str | None = Field(None, max_length=256)
    """Key for session-affinity routing (as is `user`)."""
    user: str | None = Field(None, max_length=256)


class ChatCompletionRequest(_Sampling):
    """Body of `POST /v1/chat/completions` (OpenAI)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_048_576)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    """Only one choice per request is supported."""
    logprobs: bool | None = None
    user: str | None = Field(None, max_length=256)


class CompletionRequest(_Sampling):
    """Body of `POST /v1/completions` (OpenAI)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str = Field(min_length=1)
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1, le=1_048_576)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    user: str | None = Field(None, max_length=256)


@dataclass(slots=True)
class GenerationInput:
    """What a route asks the replicas for, whatever the API it came through."""

    prompt: str = ""
    messages: list[tuple[str, str]] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = True
    include_usage: bool = False
    session_key: str | None = None


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in err["loc"]) or "body"
    message = f"{where}: {err['msg']}"
    if err["type"] not in ("missing", "extra_forbidden"):
        given = orjson.dumps(err.get("input"), default=str).decode()
        if len(given) > 60:
            given = given[:57] + "..."
        message += f" (got {given})"
    elif err["type"] == "extra_forbidden":
        message = f"{where}: unknown field"
    return ApiError(400, message, param=where, code="invalid_value")


def decode_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body: malformed JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(
            400, f"body: expected a JSON object, got {type(data).__name__}", code="invalid_json"
        )
    return data


def _stop(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop: at most {MAX_STOP} strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop: strings must not be empty", param="stop")
    return stops


def _messages(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for m in messages:
        if isinstance(m.content, list):
            content = "".join(part.text for part in m.content)
        else:
            content = m.content or ""
        out.append(("system" if m.role == "developer" else m.role, content))
    if not any(content for _, content in out):
        raise ApiError(400, "messages: every message is empty", param="messages")
    return out


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def parse_seed_text(body: bytes, session_key: str | None) -> GenerationInput:
    """A text/plain body: the whole body is the prompt, streamed back."""
    try:
        prompt = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(
            400, "body: text/plain body is not valid UTF-8", code="invalid_text"
        ) from None
    if not prompt.strip():
        raise ApiError(400, "body: the prompt is empty", param="prompt")
    return GenerationInput(prompt=prompt, session_key=session_key)


def parse_seed_json(data: dict[str, Any], session_key: str | None) -> GenerationInput:
    req: SeedChatRequest = _validate(SeedChatRequest, data)
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(
            400,
            "body: give exactly one of `prompt` or `messages`",
            param="messages",
            code="missing",
        )
    return GenerationInput(
        prompt=req.prompt or "",
        messages=_messages(req.messages) if req.messages else [],
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=_stop(req.stop),
        seed=req.seed,
        stream=req.stream,
        include_usage=True,
        session_key=req.session_id or req.user or session_key,
    )


def _stream_options(stream: bool, options: StreamOptions | None) -> bool:
    if options is None:
        return False
    if not stream:
        raise ApiError(
            400, "stream_options: only allowed when stream is true", param="stream_options"
        )
    return options.include_usage


def parse_chat_completion(
    data: dict[str, Any], session_key: str | None
) -> tuple[str, GenerationInput]:
    req: ChatCompletionRequest = _validate(ChatCompletionRequest, data)
    if req.logprobs:
        raise ApiError(400, "logprobs: not supported", param="logprobs")
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    return req.model, GenerationInput(
        messages=_messages(req.messages),
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=_stop(req.stop),
        seed=req.seed,
        stream=req.stream,
        include_usage=_stream_options(req.stream, req.stream_options),
        session_key=req.user or session_key,
    )


def parse_completion(data: dict[str, Any], session_key: str | None) -> tuple[str, GenerationInput]:
    req: CompletionRequest = _validate(CompletionRequest, data)
    if req.echo:
        raise ApiError(400, "echo: not supported", param="echo")
    if req.logprobs is not None:
        raise ApiError(400, "logprobs: not supported", param="logprobs")
    if req.suffix:
        raise ApiError(400, "suffix: not supported", param="suffix")
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise ApiError(
                400,
                f"prompt: exactly one prompt per request, got {len(req.prompt)}",
                param="prompt",
            )
        prompt = req.prompt[0]
    else:
        prompt = req.prompt
    if not prompt:
        raise ApiError(400, "prompt: must not be empty", param="prompt")
    return req.model, GenerationInput(
        prompt=prompt,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=_stop(req.stop),
        seed=req.seed,
        stream=req.stream,
        include_usage=_stream_options(req.stream, req.stream_options),
        session_key=req.user or session_key,
    )


def check_max_tokens(inp: GenerationInput, limit: int) -> int:
    """The request's max_tokens, defaulted and bounded by the model's limit."""
    if inp.max_tokens is None:
        return limit
    if inp.max_tokens > limit:
        raise ApiError(
            400,
            f"max_tokens: {inp.max_tokens} is above this model's limit of {limit}",
            param="max_tokens",
            code="invalid_value",
        )
    return inp.max_tokens


def openapi_schemas() -> dict[str, Any]:
    """Component schemas for the request bodies, refs pointing at components."""
    schemas: dict[str, Any] = {}
    for model in (SeedChatRequest, ChatCompletionRequest, CompletionRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas
