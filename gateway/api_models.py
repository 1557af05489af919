"""Request bodies the gateway accepts, validated once and turned into one plain record.

This module holds what the three generation routes share: the sampling fields
and their conversion to the replica's `SamplingParams` message, chat messages,
the `GenerationInput` record every parser produces, and the seed route's own
body (`/v1/chat/{model}`). The OpenAI bodies are in `gateway.openai_requests`.

The same pydantic models validate the bodies and describe them in the OpenAPI
document, so the document says exactly what the routes accept. Validation is
strict (no string-to-number coercion, booleans are not numbers) and every
refusal is a 400 that names the field, the reason and the value given.
Bounds follow vLLM's server (`temperature` in [0, 2], at most 4 stop
strings, penalties in [-2, 2]...), so the same bad input gets the same status.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from gateway.errors import ApiError, quote
from protos import replica_pb2

MAX_STOP = 4
"""Stop strings per request: vLLM's server default (`VLLM_MAX_STOP_STRINGS`)."""
MAX_LOGPROBS = 20
"""Alternatives per token: vLLM's default `max_logprobs`."""
MAX_N = 64
"""Choices per request (vLLM allows more; a CPU replica cannot run them usefully)."""
INT64 = 2**63
INT32 = 2**31
"""Integers the replica's request carries in 32 bits (`top_k`, token ids) stay below this."""
MAX_TOKENS = 1_048_576
"""The most `max_tokens` (and `min_tokens`) a request may ask for, whatever the model."""


TokenId = Annotated[int, Field(ge=0, lt=INT32)]
TOKEN_ID_KEY = re.compile(
    r"^(0|[1-9][0-9]{0,8}|1[0-9]{9}|20[0-9]{8}|21[0-3][0-9]{7}|214[0-6][0-9]{6}"
    r"|2147[0-3][0-9]{5}|21474[0-7][0-9]{4}|214748[0-2][0-9]{3}|2147483[0-5][0-9]{2}"
    r"|21474836[0-3][0-9]|214748364[0-7])$"
)
"""A token id written as a `logit_bias` key: a decimal in [0, 2^31), no sign, no padding."""
_STOP_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP},
        {"type": "null"},
    ]
}
"""What `stop_strings` accepts."""
_LOGIT_BIAS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "propertyNames": {"pattern": TOKEN_ID_KEY.pattern},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
        {"type": "null"},
    ],
    "description": "Token id (as a string) -> bias in [-100, 100] added to its logit.",
}


EXACT_FLOAT_INT = 2**53
"""Integers a float holds exactly; past it a float (or an integer the JSON parser read as
one, beyond 64 bits) does not say which integer was sent."""


def integral_numbers(value: Any) -> Any:
    """A JSON number without a fraction as an int (1.0 -> 1), in lists too: JSON Schema
    counts it an integer, and vLLM's server takes it. A field validator (mode "before") of
    the request bodies; validation stays strict otherwise (no strings, no booleans)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < EXACT_FLOAT_INT:
        return int(value)
    if isinstance(value, list):
        return [integral_numbers(item) for item in value]
    return value


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str | dict[str, Any] = ""


class MessageToolCall(BaseModel):
    """A tool call an earlier assistant turn made (OpenAI's `tool_calls` entries)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction


def final_message_needs_no_generation_prompt(schema: dict[str, Any]) -> None:
    """The document says what vLLM's server checks: `continue_final_message` true needs
    `add_generation_prompt` false, given (it is true by default). A `json_schema_extra`."""
    schema["if"] = {
        "properties": {"continue_final_message": {"const": True}},
        "required": ["continue_final_message"],
    }
    schema["then"] = {
        "properties": {"add_generation_prompt": {"const": False}},
        "required": ["add_generation_prompt"],
    }


_CONTENT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                "required": ["type", "text"],
            },
        },
        {"type": "null"},
    ]
}
"""What `_content` accepts: a string, or text parts (checked there with a precise message)."""


def _tool_calls_rule(schema: dict[str, Any]) -> None:
    """The document says what `chat_messages` checks: only an assistant carries tool calls."""
    schema["if"] = {
        "properties": {"tool_calls": {"type": "array", "minItems": 1}},
        "required": ["tool_calls"],
    }
    schema["then"] = {"properties": {"role": {"const": "assistant"}}}


class ChatMessage(BaseModel):
    """One chat message. Text content only: a string or a list of `{"type": "text"}` parts.

    Fields an OpenAI client echoes back from a response (`refusal`,
    `annotations`...) are ignored; `audio` and `function_call` are refused.
    """

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=_tool_calls_rule)
    role: str = Field(min_length=1, max_length=64)
    """`system`, `developer`, `user`, `assistant`, `tool`, or any role the model's chat
    template knows (vLLM's server renders custom roles too)."""
    content: Annotated[str | list[dict[str, Any]] | None, WithJsonSchema(_CONTENT_SCHEMA)] = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    audio: Annotated[dict[str, Any] | None, WithJsonSchema({"type": "null"})] = None
    """Refused unless null."""
    function_call: Annotated[dict[str, Any] | None, WithJsonSchema({"type": "null"})] = None
    """Refused unless null; use tool_calls."""


class SamplingFields(BaseModel):
    """The sampling fields every generation route accepts (vLLM's names and bounds)."""

    model_config = ConfigDict(strict=True)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    """Most tokens to generate; at most the model's configured limit (its default too)."""
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, lt=INT32)
    """0 or -1: no top-k; more than the vocabulary is the same."""
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=1e6)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: Annotated[str | list[str] | None, WithJsonSchema(_STOP_SCHEMA)] = None
    """Up to 4 strings that end the output when generated."""
    stop_token_ids: list[TokenId] | None = None
    logit_bias: Annotated[dict[str, float] | None, WithJsonSchema(_LOGIT_BIAS_SCHEMA)] = None
    """Token id (as a string) -> bias in [-100, 100] added to its logit."""
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    _integral = field_validator("*", mode="before")(integral_numbers)


def _prompt_or_messages(schema: dict[str, Any]) -> None:
    """The document says what `parse_seed_json` checks: exactly one of the two, not null."""
    for name in ("prompt", "messages"):
        field = schema["properties"][name]
        field.update(*[v for v in field.pop("anyOf") if v != {"type": "null"}])
        field.pop("default", None)
    schema["oneOf"] = [{"required": ["prompt"]}, {"required": ["messages"]}]


class SeedChatRequest(SamplingFields):
    """Body of `POST /v1/chat/{model}` as JSON (a text/plain body is the user's message)."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_prompt_or_messages)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=4096)
    prompt: str | None = Field(None, min_length=1)
    """A raw prompt, sent to the model as is (no chat template)."""
    stream: bool = True
    """Server-sent events unless false."""
    session_id: str | None = Field(None, max_length=256)
    """Key for session-affinity routing (as is `user`)."""
    user: str | None = Field(None, max_length=256)


@dataclass(slots=True)
class OutputOptions:
    """What a response carries beyond text: set only when a request asks for an extra.

    A request without any (`GenerationInput.output` None) takes the lean
    formatters of `gateway.sse`, whose per-token work is one string encode.
    """

    n: int = 1
    logprobs: int | None = None
    """Alternatives per token (chat: `top_logprobs`; completions: `logprobs`); None: no logprobs."""
    echo: bool = False
    """Completions: the prompt precedes the text. Chat: `echo_text` does."""
    echo_text: str = ""
    tool_choice: Literal["none", "required", "named"] = "none"
    tool_name: str = ""
    parallel_tool_calls: bool = True
    return_token_ids: bool = False
    tokens_as_ids: bool = False
    """Logprob tokens as `token_id:N` (vLLM's `return_tokens_as_token_ids`)."""
    continuous_usage: bool = False
    """Usage on every chunk (`stream_options.continuous_usage_stats`)."""
    role: str = "assistant"
    """The reply's role: the last message's when `add_generation_prompt` is false (vLLM)."""


@dataclass(slots=True)
class GenerationInput:
    """What a route asks the replicas for, whatever the API it came through."""

    prompt: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    messages: list[replica_pb2.ChatMessage] = field(default_factory=list)
    sampling: replica_pb2.SamplingParams = field(default_factory=replica_pb2.SamplingParams)
    """Everything but max_tokens, which `check_max_tokens` bounds and sets."""
    max_tokens: int | None = None
    """As asked; None takes the model's limit."""
    max_tokens_param: str = "max_tokens"
    """The field max_tokens came from, for the error naming it."""
    tools_json: str = ""
    chat_template: replica_pb2.ChatTemplateOptions | None = None
    stream: bool = True
    include_usage: bool = False
    session_key: str | None = None
    request_id: str | None = None
    """The body's `request_id` (vLLM), used when no X-Request-Id header names one."""
    output: OutputOptions | None = None
    """None: plain text out, the lean path."""


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors(include_url=False)[0]
    where = quote(".".join(str(part) for part in err["loc"]) or "body")
    message = f"{where}: {err['msg']}"
    if err["type"] not in ("missing", "extra_forbidden"):
        message += f" (got {quote(orjson.dumps(err.get('input'), default=str).decode())})"
    elif err["type"] == "extra_forbidden":
        message = f"{where}: unknown field"
    return ApiError(400, message, param=where, code="invalid_value")


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """`model` validated from `data`, or the 400 naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


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


def stop_strings(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop: at most {MAX_STOP} strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop: strings must not be empty", param="stop")
    return stops


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not TOKEN_ID_KEY.fullmatch(key):
            raise ApiError(
                400, f"logit_bias: keys are token ids, got {quote(repr(key))}", param="logit_bias"
            )
        if not -100 <= value <= 100:
            raise ApiError(
                400,
                f"logit_bias: {quote(key)}: bias must be in [-100, 100], got {value:g}",
                param="logit_bias",
            )
        out[int(key)] = value
    return out


FLOAT32_TINY = 1.1754944e-38
"""The smallest positive normal float32 (the wire's type of the sampling floats)."""
_POSITIVE = ("top_p", "repetition_penalty")
"""Sampling floats that must be above 0 (`gt=0`)."""


def sampling_message(req: SamplingFields) -> replica_pb2.SamplingParams:
    """The replica's sampling message for the fields every route shares (max_tokens aside)."""
    stops = stop_strings(req.stop)
    if req.max_tokens is not None and req.min_tokens > req.max_tokens:
        raise ApiError(
            400,
            f"min_tokens: must be at most max_tokens={req.max_tokens}, got {req.min_tokens}",
            param="min_tokens",
        )
    sampling = replica_pb2.SamplingParams(
        min_tokens=req.min_tokens,
        stop=stops,
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "seed",
    ):
        value = getattr(req, name)
        if value is not None:
            if name in _POSITIVE and value < FLOAT32_TINY:
                value = FLOAT32_TINY  # a float32 field: smaller would reach the replica as 0
            setattr(sampling, name, value)
    if req.stop_token_ids:
        sampling.stop_token_ids.extend(req.stop_token_ids)
    if req.logit_bias:
        sampling.logit_bias.update(_logit_bias(req.logit_bias))
    if not req.skip_special_tokens:
        sampling.skip_special_tokens = False
    if not req.spaces_between_special_tokens:
        sampling.spaces_between_special_tokens = False
    return sampling


def _content(message: ChatMessage, where: str) -> str:
    content = message.content
    if not isinstance(content, list):
        return content or ""
    texts: list[str] = []
    for i, part in enumerate(content):
        kind = part.get("type")
        text = part.get("text")
        if kind != "text" or not isinstance(text, str):
            raise ApiError(
                400,
                f"{where}.content.{i}: only text parts ({{'type': 'text', 'text': ...}}) are "
                f"supported, got type {quote(repr(kind))}",
                param=f"{where}.content",
            )
        texts.append(text)
    return "\n".join(texts)


def chat_messages(messages: list[ChatMessage]) -> list[replica_pb2.ChatMessage]:
    """The wire form of chat messages; 400 naming the message for what cannot be sent."""
    out: list[replica_pb2.ChatMessage] = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        for name in ("audio", "function_call"):
            if getattr(m, name) is not None:
                raise ApiError(
                    400, f"{where}.{name}: not supported; use tool_calls", param=f"{where}.{name}"
                )
        wire = replica_pb2.ChatMessage(
            role=m.role,
            content=_content(m, where),
            name=m.name or "",
            tool_call_id=m.tool_call_id or "",
            content_is_null=m.content is None,
        )
        if m.tool_calls:
            if m.role != "assistant":
                raise ApiError(
                    400,
                    f"{where}.tool_calls: only assistant messages carry tool calls",
                    param=f"{where}.tool_calls",
                )
            wire.tool_calls_json = orjson.dumps([c.model_dump() for c in m.tool_calls]).decode()
        out.append(wire)
    return out


def user_message(text: str) -> list[replica_pb2.ChatMessage]:
    return [replica_pb2.ChatMessage(role="user", content=text)]


def parse_seed_text(body: bytes, session_key: str | None) -> GenerationInput:
    """A text/plain body: the whole body is the user's message, rendered with the chat template."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(
            400, "body: text/plain body is not valid UTF-8", code="invalid_text"
        ) from None
    if not text.strip():
        raise ApiError(400, "body: the message is empty", param="body")
    return GenerationInput(messages=user_message(text), session_key=session_key)


def parse_seed_json(data: dict[str, Any], session_key: str | None) -> GenerationInput:
    req: SeedChatRequest = validate(SeedChatRequest, data)
    if (req.prompt is None) == (req.messages is None) or ("prompt" in data) == ("messages" in data):
        raise ApiError(
            400,
            "body: give exactly one of `prompt` or `messages`",
            param="messages",
            code="missing",
        )
    return GenerationInput(
        prompt=req.prompt or "",
        messages=chat_messages(req.messages) if req.messages else [],
        sampling=sampling_message(req),
        max_tokens=req.max_tokens,
        stream=req.stream,
        include_usage=True,
        session_key=req.session_id or req.user or session_key,
    )


def check_max_tokens(inp: GenerationInput, limit: int) -> int:
    """The request's max_tokens, defaulted and bounded by the model's limit; a min_tokens
    above the limit the request gets by default is refused here too, naming it."""
    if inp.max_tokens is None:
        if inp.sampling.min_tokens > limit:
            raise ApiError(
                400,
                f"min_tokens: must be at most {limit}, this model's limit (the "
                f"{inp.max_tokens_param} a request gets when it gives none), "
                f"got {inp.sampling.min_tokens}",
                param="min_tokens",
                code="invalid_value",
            )
        return limit
    if inp.max_tokens > limit:
        name = inp.max_tokens_param
        raise ApiError(
            400,
            f"{name}: {inp.max_tokens} is above this model's limit of {limit}",
            param=name,
            code="invalid_value",
        )
    return inp.max_tokens


def openapi_schemas() -> dict[str, Any]:
    """Component schemas for the request bodies, refs pointing at components."""
    from gateway.openai_requests import REQUEST_MODELS
    from gateway.tokenize_api import TOKENIZE_MODELS

    schemas: dict[str, Any] = {}
    models: list[type[BaseModel]] = [SeedChatRequest, *REQUEST_MODELS, *TOKENIZE_MODELS]
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas
