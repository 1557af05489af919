"""`POST /tokenize` and `POST /detokenize`, as vLLM's server serves them.

The bodies and answers are vLLM's: `/tokenize` takes a `prompt` or chat
`messages` (rendered with the chat template, as a generation would be) and
answers `{count, max_model_len, tokens, token_strs}`; `/detokenize` takes
`tokens` and answers `{prompt}`. The work is done by a ready replica of the
model through the unary Tokenize and Detokenize RPCs (with a deadline); a
replica's INVALID_ARGUMENT (a token id out of the vocabulary...) is a 400.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.api_models import (
    ChatMessage,
    TokenId,
    chat_messages,
    final_message_needs_no_generation_prompt,
    integral_numbers,
    validate,
)
from gateway.errors import ApiError
from gateway.generation import replica_error
from gateway.openai_requests import Tool, tools_to_json
from gateway.routing_table import ModelRouter
from mss.rpc import status_number
from protos import replica_pb2


class TokenizeCompletionRequest(BaseModel):
    """`/tokenize` with a prompt."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    """`/tokenize` with chat messages, rendered as a chat completion would render them."""

    model_config = ConfigDict(
        strict=True, extra="forbid", json_schema_extra=final_message_needs_no_generation_prompt
    )
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    tokens: list[TokenId] = Field(max_length=1_048_576)

    _integral = field_validator("tokens", mode="before")(integral_numbers)


TOKENIZE_MODELS: tuple[type[BaseModel], ...] = (
    TokenizeCompletionRequest,
    TokenizeChatRequest,
    DetokenizeRequest,
)

_REFUSED = {
    "chat_template": "per-request chat templates are not accepted",
    "media_io_kwargs": "text-only models",
    "mm_processor_kwargs": "text-only models",
}


def tokenize_request(data: dict[str, Any]) -> tuple[str, replica_pb2.TokenizeRequest]:
    """The model asked for and the wire request; 400 naming the field when the body is bad."""
    for name, why in _REFUSED.items():
        if data.get(name) not in (None, {}):
            raise ApiError(400, f"{name}: {why}", param=name)
        data.pop(name, None)
    if "messages" in data:
        chat: TokenizeChatRequest = validate(TokenizeChatRequest, data)
        if chat.continue_final_message and chat.add_generation_prompt:
            raise ApiError(
                400,
                "continue_final_message: Cannot set both `continue_final_message` and "
                "`add_generation_prompt` to True.",
                param="continue_final_message",
            )
        options = replica_pb2.ChatTemplateOptions(
            continue_final_message=chat.continue_final_message,
            kwargs_json=orjson.dumps(chat.chat_template_kwargs).decode()
            if chat.chat_template_kwargs
            else "",
        )
        if not chat.add_generation_prompt:
            options.add_generation_prompt = False
        tools = tools_to_json(chat.tools) if chat.tools else ""
        return chat.model or "", replica_pb2.TokenizeRequest(
            messages=chat_messages(chat.messages),
            add_special_tokens=chat.add_special_tokens,
            tools_json=tools,
            chat_template=options,
            return_token_strs=bool(chat.return_token_strs),
        )
    plain: TokenizeCompletionRequest = validate(TokenizeCompletionRequest, data)
    return plain.model or "", replica_pb2.TokenizeRequest(
        prompt=plain.prompt,
        add_special_tokens=plain.add_special_tokens,
        return_token_strs=bool(plain.return_token_strs),
    )


def detokenize_request(data: dict[str, Any]) -> tuple[str, replica_pb2.DetokenizeRequest]:
    req: DetokenizeRequest = validate(DetokenizeRequest, data)
    return req.model or "", replica_pb2.DetokenizeRequest(tokens=req.tokens)


def _client(router: ModelRouter) -> Any:
    client = router.ready_client()
    if client is None:
        raise ApiError(
            503,
            f"model {router.name!r} has no ready replica; retry later",
            code="no_replica",
            retry_after=1.0,
        )
    return client


def _failed(exc: grpc.aio.AioRpcError) -> ApiError:
    return replica_error(status_number(exc.code()), exc.details() or exc.code().name)


async def tokenize(router: ModelRouter, request: replica_pb2.TokenizeRequest) -> dict[str, Any]:
    """vLLM's `/tokenize` answer, from a ready replica of the model."""
    try:
        resp = await _client(router).tokenize(request)
    except grpc.aio.AioRpcError as exc:
        raise _failed(exc) from None
    return {
        "count": len(resp.tokens),
        "max_model_len": resp.max_model_len or router.max_model_len(),
        "tokens": list(resp.tokens),
        "token_strs": list(resp.token_strs) if request.return_token_strs else None,
    }


async def detokenize(router: ModelRouter, request: replica_pb2.DetokenizeRequest) -> dict[str, Any]:
    """vLLM's `/detokenize` answer, from a ready replica of the model."""
    try:
        resp = await _client(router).detokenize(request)
    except grpc.aio.AioRpcError as exc:
        raise _failed(exc) from None
    return {"prompt": resp.prompt}


async def prompt_text(router: ModelRouter, ids: Sequence[int]) -> str:
    """The text of a prompt sent as token ids, for `echo`, decoded as `/detokenize` decodes
    it (vLLM's server echoes such a prompt so); an id outside the vocabulary is a 400
    naming `prompt`, as the generation itself would answer."""
    try:
        answer = await detokenize(router, replica_pb2.DetokenizeRequest(tokens=ids))
    except ApiError as exc:
        if exc.status != 400:
            raise
        reason = exc.message.removeprefix("tokens: ")
        raise ApiError(400, f"prompt: {reason}", param="prompt") from None
    return str(answer["prompt"])
