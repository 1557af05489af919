"""Request parsing: what each route accepts, and the precise 400 for what it does not."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.api_models import (
    GenerationInput,
    check_max_tokens,
    decode_json,
    openapi_schemas,
    parse_chat_completion,
    parse_completion,
    parse_seed_json,
    parse_seed_text,
)
from gateway.errors import ApiError


def bad(fn: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        fn(*args)
    assert err.value.status == 400
    return err.value


def test_seed_text_and_json() -> None:
    inp = parse_seed_text(b"What is the capital of France?", "sess")
    assert (
        inp.prompt == "What is the capital of France?" and inp.stream and inp.session_key == "sess"
    )
    inp = parse_seed_json(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": False}, None
    )
    assert inp.messages == [("user", "hi")] and inp.max_tokens == 5 and not inp.stream
    inp = parse_seed_json(
        {"prompt": "x", "stop": "END", "temperature": 0, "session_id": "s1"}, None
    )
    assert inp.stop == ["END"] and inp.temperature == 0 and inp.session_key == "s1"


def test_seed_refusals_name_the_field() -> None:
    assert "malformed JSON" in bad(decode_json, b"{nope").message
    assert "expected a JSON object" in bad(decode_json, b"[1, 2]").message
    assert "not valid UTF-8" in bad(parse_seed_text, b"\xff\xfe", None).message
    assert "empty" in bad(parse_seed_text, b"   ", None).message
    assert "exactly one of" in bad(parse_seed_json, {}, None).message
    both = {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}
    assert "exactly one of" in bad(parse_seed_json, both, None).message
    err = bad(parse_seed_json, {"prompt": "a", "max_tokens": "5"}, None)
    assert err.message.startswith("max_tokens:") and err.param == "max_tokens"
    assert bad(parse_seed_json, {"prompt": "a", "max_tokens": True}, None).param == "max_tokens"
    assert bad(parse_seed_json, {"prompt": "a", "max_tokens": 0}, None).param == "max_tokens"
    assert bad(parse_seed_json, {"prompt": "a", "temperature": 3}, None).param == "temperature"
    assert bad(parse_seed_json, {"prompt": "a", "top_p": 0}, None).param == "top_p"
    assert bad(parse_seed_json, {"prompt": 5}, None).param == "prompt"
    assert bad(parse_seed_json, {"prompt": "a", "color": 1}, None).message == "color: unknown field"
    assert bad(parse_seed_json, {"messages": []}, None).param == "messages"
    err = bad(parse_seed_json, {"messages": [{"role": "wizard", "content": "x"}]}, None)
    assert err.param == "messages.0.role"
    assert (
        "every message is empty"
        in bad(parse_seed_json, {"messages": [{"role": "user", "content": ""}]}, None).message
    )
    assert "at most 16" in bad(parse_seed_json, {"prompt": "a", "stop": ["x"] * 17}, None).message
    assert "must not be empty" in bad(parse_seed_json, {"prompt": "a", "stop": [""]}, None).message


def test_openai_chat() -> None:
    model, inp = parse_chat_completion(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}],
                },
            ],
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "u1",
            "presence_penalty": 0,  # ignored, as OpenAI clients send defaults
        },
        None,
    )
    assert model == "m"
    assert inp.messages == [("system", "be brief"), ("user", "hello")]
    assert inp.max_tokens == 7 and inp.stream and inp.include_usage and inp.session_key == "u1"
    _, inp = parse_chat_completion(
        {"model": "m", "messages": [{"role": "user", "content": "x"}]}, None
    )
    assert not inp.stream and inp.max_tokens is None


def test_openai_chat_refusals() -> None:
    msg = [{"role": "user", "content": "x"}]
    assert bad(parse_chat_completion, {"messages": msg}, None).param == "model"
    assert bad(parse_chat_completion, {"model": "m"}, None).param == "messages"
    assert bad(parse_chat_completion, {"model": "m", "messages": msg, "n": 2}, None).param == "n"
    err = bad(
        parse_chat_completion,
        {"model": "m", "messages": msg, "stream_options": {"include_usage": True}},
        None,
    )
    assert err.param == "stream_options"
    assert bad(parse_chat_completion, {"model": "m", "messages": msg, "logprobs": True}, None)


def test_openai_completion() -> None:
    model, inp = parse_completion({"model": "m", "prompt": ["once upon"]}, None)
    assert model == "m" and inp.prompt == "once upon" and inp.max_tokens == 16
    assert bad(parse_completion, {"model": "m", "prompt": ["a", "b"]}, None).param == "prompt"
    assert bad(parse_completion, {"model": "m", "prompt": ""}, None).param == "prompt"
    assert bad(parse_completion, {"model": "m", "prompt": "a", "echo": True}, None).param == "echo"
    assert str(bad(parse_completion, {"model": "m", "prompt": [1, 2]}, None).param).startswith(
        "prompt"
    )


def test_max_tokens_against_the_model_limit() -> None:
    assert check_max_tokens(GenerationInput(prompt="a"), 64) == 64
    assert check_max_tokens(GenerationInput(prompt="a", max_tokens=10), 64) == 10
    err = bad(check_max_tokens, GenerationInput(prompt="a", max_tokens=65), 64)
    assert "above this model's limit of 64" in err.message


def test_openapi_schemas_describe_the_accepted_fields() -> None:
    schemas = openapi_schemas()
    seed = schemas["SeedChatRequest"]["properties"]
    assert {"prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "stream"} <= set(
        seed
    )
    assert schemas["SeedChatRequest"].get("additionalProperties") is False
    chat = schemas["ChatCompletionRequest"]
    assert set(chat["required"]) == {"model", "messages"}
    assert "ChatMessage" in schemas
    assert "$defs" not in chat
