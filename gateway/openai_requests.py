"""The OpenAI request bodies (`/v1/chat/completions`, `/v1/completions`) and their parsers.

Every field of OpenAI's and vLLM's request bodies falls in exactly one of three
places, so nothing is silently ignored:

- honoured: a field of the pydantic models below, sent to the replica through
  `GenerateRequest.sampling`, `tools_json`, `chat_template`, or shaping the
  response (`n`, `logprobs`, `echo`, `stream_options`...);
- `IGNORED_FIELDS`: accepted and dropped because they change nothing here
  (`metadata`, `store`, `service_tier`...);
- `REFUSED_FIELDS`: a 400 naming the field when given a value other than its
  default (beam search, prompt truncation, per-request chat templates...).

Any other field is refused with a 400 naming it. vLLM's server ignores unknown
fields (including its removed `guided_*` fields, with a warning in its log):
here they are refused, since a typo or a field that the server does not
implement must not return unconstrained output with a 200.

Cross-field checks and their messages follow vLLM's validators (tools and
tool_choice, structured outputs, logprobs, stream_options).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from gateway.api_models import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_TOKENS,
    ChatMessage,
    GenerationInput,
    OutputOptions,
    SamplingFields,
    TokenId,
    chat_messages,
    final_message_needs_no_generation_prompt,
    sampling_message,
    validate,
)
from gateway.errors import ApiError
from gateway.tool_calls import named_tool_schema, required_tools_schema
from protos import replica_pb2

IGNORED_FIELDS: dict[str, str] = {
    "metadata": "stored nowhere",
    "store": "nothing is stored",
    "service_tier": "one tier",
    "prompt_cache_key": "prefix caching is automatic",
    "prompt_cache_retention": "prefix caching is automatic",
    "safety_identifier": "no abuse monitoring",
    "prediction": "changes only latency on OpenAI",
    "stream_interval": "every engine step is streamed",
    "include_reasoning": "no model here has a reasoning parser",
    "return_token_offsets": "vLLM ignores it on generation routes",
    "mm_payload": "vLLM ignores it on generation routes",
    "return_mm_kwargs": "vLLM ignores it on generation routes",
    "routed_experts_prompt_start": "no mixture-of-experts routing data is returned",
}
"""Fields accepted and dropped: they change nothing here (`user` is read for affinity)."""


def _default(*defaults: object) -> Callable[[object], bool]:
    return lambda value: any(value == d and type(value) is type(d) for d in defaults)


_NONE = _default(None)
_NONE_OR_FALSE = _default(None, False)

REFUSED_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "use_beam_search": (_NONE_OR_FALSE, "beam search is not supported"),
    "length_penalty": (_default(None, 1.0, 1), "only beam search uses it"),
    "watermarking": (_NONE_OR_FALSE, "not supported"),
    "truncate_prompt_tokens": (_NONE, "prompt truncation is not supported"),
    "truncation_side": (_NONE, "prompt truncation is not supported"),
    "prompt_logprobs": (_NONE, "not supported; use echo with logprobs on /v1/completions"),
    "logprob_token_ids": (_NONE, "not supported; use logprobs"),
    "allowed_token_ids": (_NONE, "not supported; use logit_bias"),
    "bad_words": (_default(None, []), "not supported; use logit_bias"),
    "thinking_token_budget": (_NONE, "no model here has a reasoning parser"),
    "chat_template": (_NONE, "per-request chat templates are not accepted"),
    "media_io_kwargs": (_default(None, {}), "text-only models"),
    "mm_processor_kwargs": (_default(None, {}), "text-only models"),
    "priority": (_default(None, 0), "priority scheduling is not enabled"),
    "return_prompt_text": (_NONE_OR_FALSE, "not supported"),
    "cache_salt": (_NONE, "per-request prefix-cache salts are not supported"),
    "kv_transfer_params": (_NONE, "disaggregated serving is not supported"),
    "ec_transfer_params": (_NONE, "disaggregated serving is not supported"),
    "vllm_xargs": (_NONE, "no custom extensions"),
    "repetition_detection": (_NONE, "not supported"),
    "audio": (_NONE, "text-only models"),
    "modalities": (_default(None, ["text"]), "text-only models"),
    "functions": (_NONE, "deprecated; use tools"),
    "function_call": (_NONE, "deprecated; use tool_choice"),
    "verbosity": (_NONE, "not supported"),
    "web_search_options": (_NONE, "no web search"),
    "prompt_embeds": (_NONE, "prompt embeddings are not supported"),
    "suffix": (_default(None, ""), "no model here supports fill-in-the-middle"),
    "best_of": (_default(None, 1), "not supported; use n"),
    "guided_json": (_NONE, "removed from vLLM; use structured_outputs or response_format"),
    "guided_regex": (_NONE, "removed from vLLM; use structured_outputs"),
    "guided_choice": (_NONE, "removed from vLLM; use structured_outputs"),
    "guided_grammar": (_NONE, "removed from vLLM; use structured_outputs"),
    "guided_json_object": (_NONE, "removed from vLLM; use response_format"),
    "guided_decoding_backend": (_NONE, "removed from vLLM; the replica chooses"),
    "guided_whitespace_pattern": (_NONE, "removed from vLLM; use structured_outputs"),
}
"""Fields refused with a 400 unless given their default (or null): name -> (is default, why)."""

_ADD_SPECIAL_TOKENS_DEFAULT = {"chat": False, "completions": True}
"""`add_special_tokens` is honoured only at its default (the template adds what it needs)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool | None = False
    """Send a last chunk with the token counts before `[DONE]`."""
    continuous_usage_stats: bool | None = False
    """With include_usage: counts on every chunk too."""


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = ""
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


def _json_schema_given(schema: dict[str, Any]) -> None:
    """The document says what `_structured` checks: type `json_schema` comes with one."""
    schema["if"] = {"properties": {"type": {"const": "json_schema"}}}
    schema["then"] = {
        "required": ["json_schema"],
        "properties": {
            "json_schema": {
                "type": "object",
                "required": ["schema"],
                "properties": {"schema": {"type": "object"}},
            }
        },
    }


class ResponseFormat(BaseModel):
    """`text`, `json_object`, `json_schema` (with its schema), or vLLM's `structural_tag`."""

    model_config = ConfigDict(strict=True, extra="allow", json_schema_extra=_json_schema_given)
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


_NO_NUL = r"^[^\x00]*$"
_SOME_TEXT = r"^[^\x00]*[^\x00\s\x1c-\x1f][^\x00]*$"
"""Not blank (as Python's `str.strip` sees it) and no NUL: what a replica accepts."""


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint, plus options."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, pattern=_NO_NUL)
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, pattern=_SOME_TEXT)
    json_object: Annotated[bool | None, WithJsonSchema({"enum": [True, None]})] = None
    """True or left out (a replica refuses false)."""
    structural_tag: str | None = Field(None, pattern=_SOME_TEXT)
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"] = "function"
    function: NamedFunction


def _openai_rules(schema: dict[str, Any]) -> None:
    """The document says what `_stream_flags` checks: stream options need `stream` true."""
    options_given = {
        "properties": {"stream_options": {"type": "object"}},
        "required": ["stream_options"],
    }
    stream_on = {"properties": {"stream": {"const": True}}, "required": ["stream"]}
    schema.setdefault("allOf", []).append({"if": options_given, "then": stream_on})


class _OpenAIFields(SamplingFields):
    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_openai_rules)
    model: str | None = Field(None, min_length=1)
    """The model; may be left out when the gateway routes exactly one."""
    n: int | None = Field(1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    user: str | None = Field(None, max_length=256)
    """Also the session-affinity key."""
    session_id: str | None = Field(None, max_length=256)
    """Session-affinity key (vLLM's field)."""
    request_id: str | None = Field(None, pattern=r"^[!-~]{1,128}$")
    """The response's id (`chatcmpl-<request_id>`) when no X-Request-Id header names one."""
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None


def _chat_rules(schema: dict[str, Any]) -> None:
    """The document says what `_tools` and `_template` check across fields: a tool choice
    other than none needs tools, tools without a choice mean `auto` (which needs a tool-call
    parser this gateway does not have), and `final_message_needs_no_generation_prompt`."""
    _openai_rules(schema)
    final_message_needs_no_generation_prompt(schema)
    template_rule = {"if": schema.pop("if"), "then": schema.pop("then")}
    choice = schema["properties"]["tool_choice"]
    choice["anyOf"][0]["enum"].remove("auto")
    choice["description"] = '"auto" needs a tool-call parser, and none is configured here'
    schema["properties"]["tools"]["anyOf"][0]["minItems"] = 1
    tools_given = {"properties": {"tools": {"type": "array"}}, "required": ["tools"]}
    schema["allOf"] += [
        template_rule,
        {"if": tools_given, "then": {"required": ["tool_choice"]}},
        {
            "if": {
                "properties": {"tool_choice": {"not": {"enum": ["none", None]}}},
                "required": ["tool_choice"],
            },
            "then": tools_given,
        },
    ]


class ChatCompletionRequest(_OpenAIFields):
    """Body of `POST /v1/chat/completions` (OpenAI's fields and vLLM's extensions)."""

    model_config = ConfigDict(json_schema_extra=_chat_rules)

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(0, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = (
        None
    )
    """Passed to the chat template, as vLLM does."""
    echo: bool = False
    """Start the reply with the last message's content when it has the reply's role."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, str]] | None = None
    """Passed to the chat template (retrieval-augmented templates)."""
    chat_template_kwargs: dict[str, Any] | None = None


_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}
_PROMPT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "minItems": 1,
            "maxItems": 1,
        },
        {**_TOKEN_IDS, "minItems": 1},
        {"type": "array", "items": {**_TOKEN_IDS, "minItems": 1}, "minItems": 1, "maxItems": 1},
    ]
}
"""What `prompt` accepts, as `_prompt` checks it: not empty, one prompt (vLLM refuses an
empty prompt; the field's type alone would allow one)."""


class CompletionRequest(_OpenAIFields):
    """Body of `POST /v1/completions` (OpenAI's fields and vLLM's extensions)."""

    prompt: Annotated[
        str | list[str] | list[TokenId] | list[list[TokenId]], WithJsonSchema(_PROMPT_SCHEMA)
    ]
    """One prompt, not empty: a string or token ids (a list of one of either)."""
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)
    echo: bool | None = False
    """Output starts with the prompt (token ids are decoded to text by a replica)."""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


REQUEST_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest)


def _screen(data: dict[str, Any], api: Literal["chat", "completions"]) -> dict[str, Any]:
    """Drop the ignored fields; refuse refused fields given something else than their default."""
    data = dict(data)
    for name in [k for k in data if k in IGNORED_FIELDS]:
        del data[name]
    for name, (is_default, why) in REFUSED_FIELDS.items():
        if name in data:
            value = data.pop(name)
            if not is_default(value):
                raise ApiError(400, f"{name}: {why}", param=name, code="unsupported")
    if "add_special_tokens" in data:
        value = data.pop("add_special_tokens")
        default = _ADD_SPECIAL_TOKENS_DEFAULT[api]
        if value is not None and value is not default:
            raise ApiError(
                400,
                f"add_special_tokens: only {str(default).lower()} is supported here",
                param="add_special_tokens",
                code="unsupported",
            )
    return data


def _logprob_checks(data: dict[str, Any], chat: bool) -> None:
    """vLLM's checks of logprobs fields on the raw body, with its messages."""
    if not chat:
        return
    top = data.get("top_logprobs")
    if isinstance(top, int) and not isinstance(top, bool) and top != 0 and not data.get("logprobs"):
        raise ApiError(
            400,
            "top_logprobs: when using `top_logprobs`, `logprobs` must be set to true",
            param="top_logprobs",
        )


def _stream_flags(stream: bool, options: StreamOptions | None) -> tuple[bool, bool]:
    """(include_usage, continuous_usage)."""
    if options is None:
        return False, False
    if not stream:
        raise ApiError(
            400,
            "stream_options: Stream options can only be defined when `stream=True`.",
            param="stream_options",
        )
    usage = bool(options.include_usage)
    return usage, usage and bool(options.continuous_usage_stats)


def _structured(
    structured: StructuredOutputs | None, response_format: ResponseFormat | None
) -> replica_pb2.StructuredOutput | None:
    """The replica's structured-output message; response_format overrides structured_outputs."""
    out = replica_pb2.StructuredOutput()
    if structured is not None:
        kinds = [
            k
            for k in ("json_", "regex", "choice", "grammar", "json_object", "structural_tag")
            if getattr(structured, k) is not None
        ]
        if len(kinds) != 1:
            raise ApiError(
                400,
                "structured_outputs: give exactly one of json, regex, choice, grammar, "
                f"json_object or structural_tag (got {len(kinds)})",
                param="structured_outputs",
            )
        kind = kinds[0]
        value = getattr(structured, kind)
        if kind == "json_":
            out.json_schema = value if isinstance(value, str) else orjson.dumps(value).decode()
        elif kind == "choice":
            if not value:
                raise ApiError(
                    400, "structured_outputs.choice: must not be empty", param="structured_outputs"
                )
            out.choice.choices.extend(value)
        elif kind == "json_object":
            out.json_object = bool(value)
        else:
            setattr(out, kind, value)
        out.disable_any_whitespace = structured.disable_any_whitespace
        out.disable_additional_properties = structured.disable_additional_properties
        out.whitespace_pattern = structured.whitespace_pattern or ""
    if response_format is not None and response_format.type != "text":
        if structured is not None:
            raise ApiError(
                400,
                "response_format: give either response_format or structured_outputs, not both",
                param="response_format",
            )
        if response_format.type == "json_object":
            out.json_object = True
        elif response_format.type == "json_schema":
            spec = response_format.json_schema
            if spec is None:
                raise ApiError(
                    400,
                    "response_format: When response_format type is 'json_schema', the "
                    "'json_schema' field must be provided.",
                    param="response_format",
                )
            if spec.json_schema is None:
                raise ApiError(
                    400,
                    "response_format.json_schema.schema: the JSON schema is missing",
                    param="response_format",
                )
            out.json_schema = orjson.dumps(spec.json_schema).decode()
        else:
            out.structural_tag = orjson.dumps(response_format.model_dump(by_alias=True)).decode()
    return out if out.WhichOneof("kind") else None


def _model(req: _OpenAIFields) -> str:
    return req.model or ""


def _affinity(req: _OpenAIFields, session_key: str | None) -> str | None:
    return req.session_id or req.user or session_key


def tools_to_json(tools: list[Tool]) -> str:
    """The `tools` list as the chat template gets it (vLLM's `tool.model_dump()` shape)."""
    return orjson.dumps(
        [
            {
                "type": "function",
                "function": {
                    "name": t.function.name,
                    "description": t.function.description,
                    "parameters": t.function.parameters,
                    **({"strict": t.function.strict} if t.function.strict is not None else {}),
                },
            }
            for t in tools
        ]
    ).decode()


def _tools(
    req: ChatCompletionRequest, data: dict[str, Any], out: OutputOptions
) -> tuple[str, replica_pb2.StructuredOutput | None]:
    """`tools_json` for the template and the schema that forces the call, per vLLM's rules."""
    choice = req.tool_choice
    if req.tools is not None and not req.tools:
        raise ApiError(
            400,
            "tools: `tools` must not be an empty array. Either provide at least one tool "
            "or omit the field entirely.",
            param="tools",
        )
    if choice is None:
        choice = "auto" if req.tools and "tool_choice" not in data else "none"
    if choice != "none" and not req.tools:
        raise ApiError(
            400, "tool_choice: When using `tool_choice`, `tools` must be set.", param="tool_choice"
        )
    if not req.tools:
        return "", None
    tools_json = tools_to_json(req.tools)
    if choice == "none":
        return tools_json, None
    if choice == "auto":
        raise ApiError(
            400,
            'tool_choice: "auto" needs a tool-call parser for the model, and none is '
            'configured here; use "required", a named function or "none" '
            "(vLLM's server answers the same without --tool-call-parser)",
            param="tool_choice",
        )
    if req.structured_outputs is not None or (
        req.response_format is not None and req.response_format.type != "text"
    ):
        raise ApiError(
            400,
            "tool_choice: You can only either use constraints for structured outputs or "
            "tools, not both.",
            param="tool_choice",
        )
    out.parallel_tool_calls = req.parallel_tool_calls is not False
    if choice == "required":
        out.tool_choice = "required"
        functions = [(t.function.name, t.function.parameters) for t in req.tools]
        schema = required_tools_schema(functions, out.parallel_tool_calls)
    else:
        assert isinstance(choice, NamedToolChoice)
        name = choice.function.name
        match = next((t for t in req.tools if t.function.name == name), None)
        if match is None:
            raise ApiError(
                400,
                "tool_choice: The tool specified in `tool_choice` does not match any of the "
                "specified `tools`",
                param="tool_choice",
            )
        out.tool_choice, out.tool_name = "named", name
        schema = named_tool_schema(match.function.parameters)
    return tools_json, replica_pb2.StructuredOutput(json_schema=orjson.dumps(schema).decode())


def _template(req: ChatCompletionRequest) -> replica_pb2.ChatTemplateOptions | None:
    if req.continue_final_message and req.add_generation_prompt:
        raise ApiError(
            400,
            "continue_final_message: Cannot set both `continue_final_message` and "
            "`add_generation_prompt` to True.",
            param="continue_final_message",
        )
    kwargs: dict[str, Any] = dict(req.chat_template_kwargs or {})
    if req.documents is not None:
        kwargs["documents"] = req.documents
    if req.reasoning_effort is not None:
        kwargs["reasoning_effort"] = req.reasoning_effort
        kwargs.setdefault("enable_thinking", req.reasoning_effort != "none")
    if req.add_generation_prompt and not req.continue_final_message and not kwargs:
        return None
    options = replica_pb2.ChatTemplateOptions(continue_final_message=req.continue_final_message)
    if not req.add_generation_prompt:
        options.add_generation_prompt = False
    if kwargs:
        options.kwargs_json = orjson.dumps(kwargs, default=str).decode()
    return options


def _output(req: _OpenAIFields, continuous: bool) -> OutputOptions:
    return OutputOptions(
        n=req.n or 1,
        return_token_ids=bool(req.return_token_ids),
        tokens_as_ids=bool(req.return_tokens_as_token_ids),
        continuous_usage=continuous,
    )


def _needs_output(out: OutputOptions) -> bool:
    return out != OutputOptions()


def parse_chat_completion(
    data: dict[str, Any], session_key: str | None
) -> tuple[str, GenerationInput]:
    _logprob_checks(data, chat=True)
    req: ChatCompletionRequest = validate(ChatCompletionRequest, _screen(data, "chat"))
    stream = bool(req.stream)
    include_usage, continuous = _stream_flags(stream, req.stream_options)
    sampling = sampling_message(req)
    out = _output(req, continuous)
    messages = chat_messages(req.messages)
    if req.logprobs:
        out.logprobs = req.top_logprobs or 0
        sampling.logprobs = out.logprobs
    if not req.add_generation_prompt:
        out.role = messages[-1].role
    if req.echo and messages[-1].role == out.role:
        out.echo_text = messages[-1].content
    tools_json, forced = _tools(req, data, out)
    structured = forced or _structured(req.structured_outputs, req.response_format)
    if structured is not None:
        sampling.structured.CopyFrom(structured)
    sampling.n = out.n
    max_tokens: int | None = req.max_completion_tokens
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = req.max_tokens, "max_tokens"
    if req.min_tokens and max_tokens is not None and req.min_tokens > max_tokens:
        raise ApiError(
            400,
            f"min_tokens: must be at most {param}={max_tokens}, got {req.min_tokens}",
            param="min_tokens",
        )
    return _model(req), GenerationInput(
        messages=messages,
        sampling=sampling,
        max_tokens=max_tokens,
        max_tokens_param=param,
        tools_json=tools_json,
        chat_template=_template(req),
        stream=stream,
        include_usage=include_usage,
        session_key=_affinity(req, session_key),
        request_id=req.request_id,
        output=out if _needs_output(out) else None,
    )


def _prompt(req: CompletionRequest) -> tuple[str, list[int]]:
    prompt = req.prompt
    if isinstance(prompt, list):
        if not prompt:
            raise ApiError(
                400,
                "prompt: Either prompt or prompt_embeds must be provided and non-empty.",
                param="prompt",
            )
        if isinstance(prompt[0], int):
            return "", [int(t) for t in prompt if isinstance(t, int)]
        if len(prompt) != 1:
            raise ApiError(
                400,
                f"prompt: one prompt per request is supported, got {len(prompt)}",
                param="prompt",
            )
        first = prompt[0]
        if isinstance(first, list):
            if not first:
                raise ApiError(400, "prompt: the list of token ids is empty", param="prompt")
            return "", list(first)
        prompt = first
    if not prompt:
        raise ApiError(
            400,
            "prompt: Either prompt or prompt_embeds must be provided and non-empty.",
            param="prompt",
        )
    return prompt, []


def parse_completion(data: dict[str, Any], session_key: str | None) -> tuple[str, GenerationInput]:
    _logprob_checks(data, chat=False)
    if data.get("max_tokens", 0) is None:
        data = {**data, "max_tokens": 16}  # vLLM reads null as its default
    req: CompletionRequest = validate(CompletionRequest, _screen(data, "completions"))
    stream = bool(req.stream)
    include_usage, continuous = _stream_flags(stream, req.stream_options)
    prompt, prompt_ids = _prompt(req)
    sampling = sampling_message(req)
    out = _output(req, continuous)
    if req.logprobs is not None:
        out.logprobs = req.logprobs
        sampling.logprobs = req.logprobs
    if req.echo:
        # With `return_token_ids` the prompt comes back as ids alone, its text not echoed
        # (vLLM's way); a prompt of token ids is echoed as its text, which a replica
        # decodes once the request is routed (`Gateway.serve`).
        out.echo, out.echo_text = True, "" if req.return_token_ids else prompt
        if req.logprobs is not None:
            sampling.prompt_logprobs = req.logprobs
    structured = _structured(req.structured_outputs, req.response_format)
    if structured is not None:
        sampling.structured.CopyFrom(structured)
    sampling.n = out.n
    return _model(req), GenerationInput(
        prompt=prompt,
        prompt_token_ids=prompt_ids,
        sampling=sampling,
        max_tokens=req.max_tokens,
        stream=stream,
        include_usage=include_usage,
        session_key=_affinity(req, session_key),
        request_id=req.request_id,
        output=out if _needs_output(out) else None,
    )
