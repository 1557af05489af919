"""What a request asks the engine to render: a prompt, token ids, or chat messages.

`prompt_source` reads a `GenerateRequest` (or a `TokenizeRequest`) into a
`PromptSource`: the chat messages back in the OpenAI shape vLLM's server
renders (`content` null kept as None, `tool_calls` as a list, `name` and
`tool_call_id` only when given), the `tools` list, and the chat template's
keyword arguments merged the way vLLM's server merges them
(`ChatCompletionRequest.build_chat_params`: the request's
`chat_template_kwargs` first, then `add_generation_prompt` and
`continue_final_message` over them). Each engine renders a `PromptSource`
its own way; this module only validates and reshapes, so it is cheap and
runs on the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from protos import replica_pb2
from replica.sampling import InvalidRequest

_RESERVED_KWARGS = ("chat_template", "tokenize")
"""Template kwargs a request may not set (vLLM refuses them too)."""


@dataclass(slots=True)
class PromptSource:
    """Exactly one of `prompt`, `prompt_token_ids` or `messages` is set (or none: refused)."""

    prompt: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """add_generation_prompt, continue_final_message and the request's extra kwargs."""
    add_special_tokens: bool | None = None
    """None: the API's default (true for a prompt, false for rendered messages)."""

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


def prompt_source(
    request: replica_pb2.GenerateRequest | replica_pb2.TokenizeRequest,
) -> PromptSource:
    """Validate and reshape the request's input; raises InvalidRequest naming the field."""
    token_ids = list(getattr(request, "prompt_token_ids", ()))
    given = [
        name
        for name, v in (
            ("prompt", request.prompt),
            ("prompt_token_ids", token_ids),
            ("messages", request.messages),
        )
        if v
    ]
    if len(given) > 1:
        raise InvalidRequest(f"{given[0]}: give one of {' or '.join(given)}, not both")
    source = PromptSource(prompt=request.prompt, prompt_token_ids=token_ids)
    if isinstance(request, replica_pb2.TokenizeRequest) and request.HasField("add_special_tokens"):
        source.add_special_tokens = request.add_special_tokens
    if request.messages:
        source.messages = openai_messages(request.messages)
        source.tools = parse_tools(request.tools_json)
        source.template_kwargs = template_kwargs(request.chat_template)
    elif request.tools_json:
        raise InvalidRequest("tools: only chat messages can be rendered with tools")
    return source


def openai_messages(messages: Sequence[replica_pb2.ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the OpenAI API sent them, for the engine's renderer."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not m.role:
            raise InvalidRequest(f"messages[{i}].role: must not be empty")
        message: dict[str, Any] = {
            "role": m.role,
            "content": None if m.content_is_null else m.content,
        }
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls_json:
            if m.role != "assistant":
                raise InvalidRequest(f"messages[{i}].tool_calls: only assistant messages have them")
            message["tool_calls"] = _json_list(m.tool_calls_json, f"messages[{i}].tool_calls")
        out.append(message)
    return out


def parse_tools(tools_json: str) -> list[dict[str, Any]] | None:
    """The OpenAI `tools` list, or None when the request has none."""
    if not tools_json:
        return None
    tools = _json_list(tools_json, "tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"tools[{i}]: must be an object")
    return tools


def template_kwargs(options: replica_pb2.ChatTemplateOptions) -> dict[str, Any]:
    """The template's keyword arguments, merged as vLLM's server merges them."""
    kwargs: dict[str, Any] = {}
    if options.kwargs_json:
        try:
            extra = json.loads(options.kwargs_json)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"chat_template_kwargs: not valid JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise InvalidRequest("chat_template_kwargs: must be a JSON object")
        reserved = sorted(set(extra) & set(_RESERVED_KWARGS))
        if reserved:
            raise InvalidRequest(f"chat_template_kwargs: may not set {', '.join(reserved)}")
        # vLLM's merge drops values that mean "unset".
        kwargs.update({k: v for k, v in extra.items() if v is not None and v != "auto"})
    add_generation_prompt = (
        options.add_generation_prompt if options.HasField("add_generation_prompt") else True
    )
    if options.continue_final_message and add_generation_prompt:
        raise InvalidRequest(
            "continue_final_message: cannot be true while add_generation_prompt is true"
        )
    kwargs["add_generation_prompt"] = add_generation_prompt
    kwargs["continue_final_message"] = options.continue_final_message
    return kwargs


def _json_list(text: str, name: str) -> list[Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{name}: not valid JSON: {exc}") from None
    if not isinstance(value, list):
        raise InvalidRequest(f"{name}: must be a JSON list")
    return value
