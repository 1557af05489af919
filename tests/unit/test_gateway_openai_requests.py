"""OpenAI request bodies: every honoured field reaches the GenerateRequest, every refused
field is a 400 naming it, ignored fields change nothing, unknown fields are refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.api_models import GenerationInput, parse_seed_json
from gateway.errors import ApiError
from gateway.generation import build_request
from gateway.openai_requests import (
    IGNORED_FIELDS,
    REFUSED_FIELDS,
    CompletionRequest,
    parse_chat_completion,
    parse_completion,
)

MSG = [{"role": "user", "content": "x"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def chat(**fields: Any) -> GenerationInput:
    return parse_chat_completion({"model": "m", "messages": MSG, **fields}, None)[1]


def completion(**fields: Any) -> GenerationInput:
    return parse_completion({"model": "m", "prompt": "p", **fields}, None)[1]


def bad_chat(**fields: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        parse_chat_completion({"model": "m", "messages": MSG, **fields}, None)
    assert err.value.status == 400
    return err.value


def bad_completion(**fields: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        parse_completion({"model": "m", "prompt": "p", **fields}, None)
    assert err.value.status == 400
    return err.value


def test_chat_sampling_fields_reach_the_wire_request() -> None:
    inp = chat(
        n=3,
        temperature=0.5,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.1,
        seed=42,
        stop=["a", "b"],
        stop_token_ids=[5],
        logit_bias={"7": 2.5},
        min_tokens=3,
        max_completion_tokens=9,
        max_tokens=99,
        ignore_eos=True,
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        logprobs=True,
        top_logprobs=4,
    )
    req = build_request(inp, "rid", 9)
    s = req.sampling
    assert (s.n, s.max_tokens, s.min_tokens, s.top_k, s.seed) == (3, 9, 3, 20, 42)
    assert abs(s.temperature - 0.5) < 1e-6 and abs(s.top_p - 0.9) < 1e-6
    assert abs(s.min_p - 0.05) < 1e-6 and abs(s.repetition_penalty - 1.1) < 1e-6
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, 0.25)
    assert list(s.stop) == ["a", "b"] and list(s.stop_token_ids) == [5]
    assert dict(s.logit_bias) == {7: 2.5}
    assert s.ignore_eos and s.include_stop_str_in_output
    assert s.HasField("skip_special_tokens") and not s.skip_special_tokens
    assert not s.spaces_between_special_tokens
    assert s.HasField("logprobs") and s.logprobs == 4
    assert inp.max_tokens == 9 and inp.max_tokens_param == "max_completion_tokens"
    assert inp.output is not None and inp.output.n == 3 and inp.output.logprobs == 4
    assert [(m.role, m.content) for m in req.messages] == [("user", "x")]


def test_a_plain_chat_takes_the_lean_path_and_sets_nothing_extra() -> None:
    inp = chat(stream=True, stream_options={"include_usage": True}, user="u1")
    assert inp.output is None and inp.include_usage and inp.session_key == "u1"
    req = build_request(inp, "rid", 16)
    for name in ("temperature", "top_p", "top_k", "seed", "logprobs", "skip_special_tokens"):
        assert not req.sampling.HasField(name), name
    assert req.sampling.n in (0, 1) and not req.sampling.HasField("structured")
    assert not req.tools_json and not req.HasField("chat_template")
    assert chat(stream=True, logprobs=False, top_logprobs=None, n=1).output is None


def test_chat_messages_keep_roles_names_and_tool_calls() -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}],
        },
        {
            "role": "assistant",
            "content": None,
            "refusal": None,  # echoed back by clients: ignored
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny", "name": "get_weather"},
    ]
    body = {"model": "m", "messages": messages, "tools": [WEATHER], "tool_choice": "none"}
    _, inp = parse_chat_completion(body, None)
    dev, user, assistant, tool = inp.messages
    assert (dev.role, dev.content) == ("developer", "be brief")
    assert user.content == "hel\nlo"  # text parts joined by newlines, as vLLM does
    assert assistant.content_is_null and json.loads(assistant.tool_calls_json)[0]["id"] == "call_1"
    assert (tool.role, tool.tool_call_id, tool.name) == ("tool", "call_1", "get_weather")
    assert json.loads(inp.tools_json) == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": WEATHER["function"]["parameters"],  # type: ignore[index]
            },
        }
    ]


def test_tool_choice_named_and_required_force_a_schema() -> None:
    inp = chat(
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert inp.output is not None and inp.output.tool_choice == "named"
    assert inp.output.tool_name == "get_weather"
    schema = json.loads(inp.sampling.structured.json_schema)
    assert schema == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert len(json.loads(inp.tools_json)) == 2  # the template still sees every tool

    inp = chat(tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False)
    assert inp.output is not None and inp.output.tool_choice == "required"
    assert not inp.output.parallel_tool_calls
    schema = json.loads(inp.sampling.structured.json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [v["properties"]["name"]["enum"] for v in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    clock = schema["items"]["anyOf"][1]["properties"]["parameters"]
    assert clock == {"type": "object", "properties": {}}  # no parameters: any object

    none = chat(tools=[WEATHER], tool_choice="none")
    assert none.output is None and none.tools_json and not none.sampling.HasField("structured")


def test_tool_choice_refusals_match_vllm() -> None:
    err = bad_chat(tools=[WEATHER])  # no tool_choice with tools is "auto", as in vLLM
    assert err.param == "tool_choice" and "auto" in err.message
    assert bad_chat(tools=[WEATHER], tool_choice="auto").param == "tool_choice"
    assert "must not be an empty array" in bad_chat(tools=[]).message
    assert "`tools` must be set" in bad_chat(tool_choice="required").message
    err = bad_chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "does not match any" in err.message
    err = bad_chat(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})
    assert "not both" in err.message
    assert str(bad_chat(tool_choice="sometimes").param).startswith("tool_choice")


def test_response_format_and_structured_outputs() -> None:
    assert chat(response_format={"type": "json_object"}).sampling.structured.json_object
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    inp = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": schema}}
    )
    assert json.loads(inp.sampling.structured.json_schema) == schema
    assert not chat(response_format={"type": "text"}).sampling.HasField("structured")
    s = completion(structured_outputs={"choice": ["yes", "no"]}).sampling.structured
    assert list(s.choice.choices) == ["yes", "no"]
    regex = chat(structured_outputs={"regex": "[0-9]+", "disable_any_whitespace": True})
    s = regex.sampling.structured
    assert s.regex == "[0-9]+" and s.disable_any_whitespace
    assert chat(structured_outputs={"json": schema}).sampling.structured.json_schema
    assert chat(structured_outputs={"grammar": "root ::= 'a'"}).sampling.structured.grammar

    err = bad_chat(response_format={"type": "json_schema"})
    assert err.param == "response_format" and "'json_schema' field must be provided" in err.message
    assert bad_chat(structured_outputs={"regex": "a", "choice": ["a"]}).param == (
        "structured_outputs"
    )
    assert bad_chat(structured_outputs={}).param == "structured_outputs"
    assert str(bad_chat(response_format={"type": "xml"}).param).startswith("response_format")


def test_chat_template_options() -> None:
    inp = chat(
        add_generation_prompt=False,
        continue_final_message=True,
        chat_template_kwargs={"flavour": 1},
        documents=[{"title": "t", "text": "x"}],
        reasoning_effort="low",
    )
    options = inp.chat_template
    assert options is not None and options.HasField("add_generation_prompt")
    assert not options.add_generation_prompt and options.continue_final_message
    assert json.loads(options.kwargs_json) == {
        "flavour": 1,
        "documents": [{"title": "t", "text": "x"}],
        "reasoning_effort": "low",
        "enable_thinking": True,
    }
    assert inp.output is not None and inp.output.role == "user"  # the last message's role
    err = bad_chat(continue_final_message=True)
    assert err.param == "continue_final_message" and "Cannot set both" in err.message


def test_stream_options_and_logprob_checks_match_vllm() -> None:
    inp = chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert inp.include_usage and inp.output is not None and inp.output.continuous_usage
    assert (
        "only be defined when `stream=True`"
        in bad_chat(stream_options={"include_usage": True}).message
    )
    err = bad_chat(top_logprobs=3)
    assert err.param == "top_logprobs" and "`logprobs` must be set to true" in err.message
    assert bad_chat(logprobs=True, top_logprobs=21).param == "top_logprobs"
    assert bad_chat(n=0).param == "n" and bad_chat(n=65).param == "n"
    assert bad_completion(logprobs=21).param == "logprobs"
    assert bad_completion(logprobs=-1).param == "logprobs"


def test_completion_prompts_echo_and_logprobs() -> None:
    assert completion().prompt == "p" and completion().max_tokens == 16
    assert completion(max_tokens=None).max_tokens == 16  # null is vLLM's default too
    _, inp = parse_completion({"model": "m", "prompt": [1, 2, 3]}, None)
    assert inp.prompt_token_ids == [1, 2, 3] and not inp.prompt
    assert build_request(inp, "r", 4).prompt_token_ids == [1, 2, 3]
    _, inp = parse_completion({"model": "m", "prompt": [[4, 5]]}, None)
    assert inp.prompt_token_ids == [4, 5]
    _, inp = parse_completion({"model": "m", "prompt": ["once"]}, None)
    assert inp.prompt == "once"

    inp = completion(echo=True, logprobs=2)
    assert inp.output is not None and inp.output.echo and inp.output.echo_text == "p"
    assert inp.sampling.logprobs == 2 and inp.sampling.prompt_logprobs == 2
    assert completion(logprobs=0).sampling.HasField("logprobs")

    with pytest.raises(ApiError) as err:
        parse_completion({"model": "m", "prompt": ["a", "b"]}, None)
    assert err.value.param == "prompt"
    with pytest.raises(ApiError) as err:
        parse_completion({"model": "m", "prompt": ""}, None)
    assert "must be provided and non-empty" in err.value.message
    with pytest.raises(ApiError) as err:
        parse_completion({"model": "m", "prompt": [1, True]}, None)
    assert str(err.value.param).startswith("prompt")


@pytest.mark.parametrize("name", sorted(REFUSED_FIELDS))
def test_every_refused_field_is_a_400_naming_it(name: str) -> None:
    value: object = {"x": 1} if name.endswith(("_params", "kwargs", "xargs")) else 12345
    for parse, body in (
        (parse_chat_completion, {"model": "m", "messages": MSG}),
        (parse_completion, {"model": "m", "prompt": "p"}),
    ):
        with pytest.raises(ApiError) as err:
            parse(body | {name: value}, None)
        assert err.value.status == 400 and err.value.param == name
        assert err.value.message.startswith(f"{name}: ")


@pytest.mark.parametrize(
    ("name", "default"),
    [
        ("use_beam_search", False),
        ("priority", 0),
        ("bad_words", []),
        ("length_penalty", 1.0),
        ("modalities", ["text"]),
        ("cache_salt", None),
    ],
)
def test_a_refused_field_at_its_default_is_accepted(name: str, default: object) -> None:
    assert chat(**{name: default}).output is None


def test_ignored_fields_change_nothing_and_unknown_fields_are_refused() -> None:
    plain = build_request(chat(), "r", 8)
    values = {name: "x" for name in IGNORED_FIELDS}
    ignored = build_request(chat(**values), "r", 8)
    assert ignored == plain
    assert "user" not in IGNORED_FIELDS  # read for session affinity
    err = bad_chat(temprature=0.5)
    assert err.message == "temprature: unknown field" and err.param == "temprature"
    assert bad_completion(colour="red").param == "colour"
    assert bad_chat(add_special_tokens=True).param == "add_special_tokens"
    assert bad_completion(add_special_tokens=False).param == "add_special_tokens"
    assert chat(add_special_tokens=False).output is None
    err = bad_chat(messages=[{"role": "user", "content": "x", "audio": {"id": "a"}}])
    assert err.param == "messages.0.audio"


def test_model_request_id_and_affinity() -> None:
    model, inp = parse_chat_completion(
        {"messages": MSG, "request_id": "abc", "session_id": "s"}, None
    )
    assert model == "" and inp.request_id == "abc" and inp.session_key == "s"
    assert bad_chat(request_id="has space").param == "request_id"
    assert chat(user="u").session_key == "u"


def test_a_number_without_a_fraction_is_an_integer_as_json_schema_says() -> None:
    _, inp = parse_completion({"model": "m", "prompt": "p", "seed": 1.0, "max_tokens": 3.0}, None)
    assert inp.sampling.seed == 1 and inp.max_tokens == 3
    _, inp = parse_completion({"model": "m", "prompt": [5.0, 6]}, None)
    assert inp.prompt_token_ids == [5, 6]
    # Beyond 2^53 a float does not say which integer was sent (orjson reads an integer
    # beyond 64 bits as one): refused rather than rounded into range.
    for bad_value in (1.5, "1", True, float(-(2**63) - 2048)):
        with pytest.raises(ApiError) as err:
            parse_completion({"model": "m", "prompt": "p", "seed": bad_value}, None)
        assert err.value.param == "seed"


@pytest.mark.parametrize("name", ["top_k", "min_tokens", "max_tokens"])
def test_integers_beyond_what_the_replica_carries_are_a_400_on_every_route(name: str) -> None:
    """The replica's request holds these in 32 bits: a larger one is refused, naming the
    field, rather than failing as the request is built."""
    for value in (2**31, 19_728_366_681):
        assert bad_chat(**{name: value}).param == name
        assert bad_completion(**{name: value}).param == name
        with pytest.raises(ApiError) as err:
            parse_seed_json({"prompt": "p", name: value}, None)
        assert (err.value.status, err.value.param) == (400, name)


def test_the_largest_integers_accepted_fit_the_replica_s_request() -> None:
    inp = chat(top_k=2**31 - 1, min_tokens=1_048_576, max_tokens=1_048_576)
    request = build_request(inp, "r", 1_048_576)
    assert request.sampling.top_k == 2**31 - 1 and request.sampling.min_tokens == 1_048_576


def test_echo_takes_a_prompt_of_token_ids() -> None:
    ids = completion(prompt=[1, 2], echo=True)
    assert ids.output is not None and ids.output.echo and ids.output.echo_text == ""
    assert ids.prompt_token_ids == [1, 2]  # the gateway has a replica decode them
    text = completion(echo=True)
    assert text.output is not None and text.output.echo_text == text.prompt
    both = completion(echo=True, return_token_ids=True)
    assert both.output is not None and both.output.echo and both.output.echo_text == ""
    rules = CompletionRequest.model_json_schema().get("allOf", [])
    assert not any("echo" in str(rule.get("if")) for rule in rules)


def test_the_documented_prompt_schema_refuses_what_the_parser_refuses() -> None:
    schema = CompletionRequest.model_json_schema()["properties"]["prompt"]
    variants = schema["anyOf"]
    assert {"type": "string", "minLength": 1} in variants
    assert all(v.get("minItems") == 1 for v in variants if v["type"] == "array")
    empties: list[object] = ["", [], [""], [[]]]
    for empty in empties:
        with pytest.raises(ApiError):
            parse_completion({"model": "m", "prompt": empty}, None)
