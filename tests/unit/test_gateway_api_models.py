"""Request parsing: what each route accepts, and the precise 400 for what it does not."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.api_models import (
    GenerationInput,
    check_max_tokens,
    decode_json,
    openapi_schemas,
    parse_seed_json,
    parse_seed_text,
)
from gateway.errors import ApiError
from protos import replica_pb2


def bad(fn: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        fn(*args)
    assert err.value.status == 400
    return err.value


def test_seed_text_is_the_users_message_and_json_has_the_sampling_fields() -> None:
    inp = parse_seed_text(b"What is the capital of France?", "sess")
    assert not inp.prompt and inp.stream and inp.session_key == "sess"
    assert [(m.role, m.content) for m in inp.messages] == [
        ("user", "What is the capital of France?")
    ]  # rendered with the chat template on the replica, not sent raw
    inp = parse_seed_json(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": False}, None
    )
    assert [(m.role, m.content) for m in inp.messages] == [("user", "hi")]
    assert inp.max_tokens == 5 and not inp.stream and inp.output is None
    inp = parse_seed_json(
        {
            "prompt": "x",
            "stop": "END",
            "temperature": 0,
            "session_id": "s1",
            "top_k": 5,
            "min_p": 0.1,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "repetition_penalty": 1.2,
            "seed": 7,
            "stop_token_ids": [2],
            "logit_bias": {"13": -100},
            "min_tokens": 2,
            "ignore_eos": True,
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
        },
        None,
    )
    s = inp.sampling
    assert inp.prompt == "x" and list(s.stop) == ["END"] and inp.session_key == "s1"
    assert s.HasField("temperature") and s.temperature == 0
    assert (s.top_k, s.seed, list(s.stop_token_ids), dict(s.logit_bias)) == (5, 7, [2], {13: -100})
    assert abs(s.min_p - 0.1) < 1e-6 and abs(s.repetition_penalty - 1.2) < 1e-6
    assert (s.presence_penalty, s.frequency_penalty, s.min_tokens) == (0.5, -0.5, 2)
    assert s.ignore_eos and s.include_stop_str_in_output and not s.skip_special_tokens
    assert not parse_seed_json({"prompt": "x"}, None).sampling.HasField("temperature")


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
    assert bad(parse_seed_json, {"prompt": "a", "presence_penalty": 3}, None).param == (
        "presence_penalty"
    )
    assert bad(parse_seed_json, {"prompt": "a", "logit_bias": {"x": 1}}, None).param == (
        "logit_bias"
    )
    assert bad(parse_seed_json, {"prompt": "a", "logit_bias": {"1": 101}}, None).param == (
        "logit_bias"
    )
    err = bad(parse_seed_json, {"prompt": "a", "min_tokens": 5, "max_tokens": 2}, None)
    assert err.param == "min_tokens"
    assert bad(parse_seed_json, {"prompt": 5}, None).param == "prompt"
    assert bad(parse_seed_json, {"prompt": "a", "color": 1}, None).message == "color: unknown field"
    assert bad(parse_seed_json, {"prompt": "a", "n": 2}, None).message == "n: unknown field"
    assert bad(parse_seed_json, {"messages": []}, None).param == "messages"
    err = bad(parse_seed_json, {"messages": [{"role": "", "content": "x"}]}, None)
    assert err.param == "messages.0.role"
    # Any other role goes to the chat template, as vLLM's server does.
    custom = parse_seed_json({"messages": [{"role": "wizard", "content": "x"}]}, None)
    assert [m.role for m in custom.messages] == ["wizard"]
    # Empty messages go to the chat template too (vLLM's server renders them; the replica
    # refuses a prompt that renders to nothing).
    empty = parse_seed_json({"messages": [{"role": "tool", "content": ""}]}, None)
    assert [(m.role, m.content) for m in empty.messages] == [("tool", "")]
    assert "at most 4" in bad(parse_seed_json, {"prompt": "a", "stop": ["x"] * 5}, None).message
    assert "must not be empty" in bad(parse_seed_json, {"prompt": "a", "stop": [""]}, None).message
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    err = bad(parse_seed_json, {"messages": [image]}, None)
    assert err.param == "messages.0.content" and "image_url" in err.message


def test_max_tokens_against_the_model_limit() -> None:
    assert check_max_tokens(GenerationInput(prompt="a"), 64) == 64
    assert check_max_tokens(GenerationInput(prompt="a", max_tokens=10), 64) == 10
    err = bad(check_max_tokens, GenerationInput(prompt="a", max_tokens=65), 64)
    assert "above this model's limit of 64" in err.message
    named = GenerationInput(prompt="a", max_tokens=65, max_tokens_param="max_completion_tokens")
    assert bad(check_max_tokens, named, 64).param == "max_completion_tokens"
    # Without max_tokens the request gets the model's limit: min_tokens is held to it.
    at_most = GenerationInput(prompt="a", sampling=replica_pb2.SamplingParams(min_tokens=64))
    assert check_max_tokens(at_most, 64) == 64
    above = GenerationInput(prompt="a", sampling=replica_pb2.SamplingParams(min_tokens=65))
    err = bad(check_max_tokens, above, 64)
    assert err.param == "min_tokens" and "must be at most 64, this model's limit" in err.message


def test_openapi_schemas_describe_the_accepted_fields() -> None:
    schemas = openapi_schemas()
    seed = schemas["SeedChatRequest"]["properties"]
    assert {"prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "stream"} <= set(
        seed
    )
    assert schemas["SeedChatRequest"].get("additionalProperties") is False
    chat = schemas["ChatCompletionRequest"]
    assert set(chat["required"]) == {"messages"}  # model may be left out, as in vLLM
    assert "ChatMessage" in schemas
    assert "$defs" not in chat
    assert {"tools", "tool_choice", "response_format", "logprobs", "n"} <= set(chat["properties"])
    assert {"TokenizeChatRequest", "TokenizeCompletionRequest", "DetokenizeRequest"} <= set(schemas)
