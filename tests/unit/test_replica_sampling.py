"""The replica's reading of a request: sampling validation and its mapping onto vLLM,
chat messages and template options, and the fake engine's structured answers."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from protos import replica_pb2
from replica.chat import openai_messages, prompt_source, template_kwargs
from replica.fake_structured import minimal_instance, structured_text
from replica.sampling import InvalidRequest, Limits, Sampling, parse_sampling, parse_structured

LIMITS = Limits(vocab_size=1000, max_model_len=2048, max_logprobs=20, max_n=8)


def parse(chat: bool = False, prompt_len: int = 10, **fields: Any) -> Sampling:
    return parse_sampling(replica_pb2.SamplingParams(**fields), LIMITS, prompt_len, chat)


def refused(chat: bool = False, **fields: Any) -> str:
    with pytest.raises(InvalidRequest) as caught:
        parse(chat=chat, **fields)
    return str(caught.value)


def test_a_request_that_sets_nothing_gets_the_engine_defaults() -> None:
    s = parse(max_tokens=5)
    assert s == Sampling(max_tokens=5)
    assert (s.n, s.temperature, s.top_p, s.seed, s.logprobs, s.structured) == (
        1,
        None,
        None,
        None,
        None,
        None,
    )
    # 0 means what vLLM's server does when a request gives none: the rest of the context.
    assert parse(max_tokens=0, prompt_len=48).max_tokens == 2000


def test_values_given_are_kept_including_zeros() -> None:
    s = parse(
        max_tokens=9,
        n=3,
        temperature=0.5,
        top_p=0.5,
        top_k=0,
        min_p=0.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=1.3,
        seed=0,
        stop=["x"],
        stop_token_ids=[7],
        logit_bias={5: 100.0},
        logprobs=0,
        prompt_logprobs=2,
        min_tokens=2,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        include_stop_str_in_output=True,
        ignore_eos=True,
    )
    assert (s.n, s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (3, 0.5, 0.5, 0, 0.0, 0)
    assert (s.presence_penalty, s.frequency_penalty) == (-2.0, 2.0)
    # The float32 wire value back to the decimal the client sent, as vLLM's server has it.
    assert s.repetition_penalty == 1.3
    assert parse(max_tokens=1, temperature=0.7, logit_bias={1: 150.0, 2: -0.3}).temperature == 0.7
    assert parse(max_tokens=1, logit_bias={1: 150.0, 2: -0.3}).logit_bias == {1: 100.0, 2: -0.3}
    assert (s.stop, s.stop_token_ids, s.logit_bias) == (["x"], [7], {5: 100.0})
    assert (s.logprobs, s.prompt_logprobs, s.min_tokens) == (0, 2, 2)
    assert not s.skip_special_tokens and not s.spaces_between_special_tokens
    assert s.include_stop_str_in_output and s.ignore_eos


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 2039}, "max_tokens"),
        ({"n": 9}, "n"),
        ({"n": -1}, "n"),
        ({"n": 2, "temperature": 0.0}, "n"),
        ({"min_tokens": 6}, "min_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"stop_token_ids": [1000]}, "stop_token_ids"),
        ({"logit_bias": {1000: 1.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {3: float("inf")}}, "logit_bias"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"structured": {"json_schema": "{"}}, "response_format"),
        ({"structured": {"json_schema": "[1]"}}, "response_format"),
        ({"structured": {"json_object": False}}, "response_format"),
        ({"structured": {"choice": {}}}, "structured_outputs"),
        ({"structured": {"grammar": "  "}}, "structured_outputs"),
        ({"structured": {}}, "structured_outputs"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(
    fields: dict[str, Any], field_name: str
) -> None:
    fields.setdefault("max_tokens", 5)
    assert refused(**fields).startswith(f"{field_name}:")


def test_logprobs_is_named_as_each_api_names_it() -> None:
    assert refused(chat=True, max_tokens=5, logprobs=30).startswith("top_logprobs:")
    assert refused(chat=False, max_tokens=5, logprobs=30).startswith("logprobs:")


def test_structured_outputs_are_parsed() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    s = parse_structured(
        replica_pb2.StructuredOutput(json_schema=json.dumps(schema), disable_any_whitespace=True)
    )
    assert (s.kind, s.value, s.disable_any_whitespace, s.field_name) == (
        "json",
        schema,
        True,
        "response_format",
    )
    choice = parse_structured(
        replica_pb2.StructuredOutput(choice=replica_pb2.ChoiceList(choices=["yes", "no"]))
    )
    assert (choice.kind, choice.value, choice.field_name) == (
        "choice",
        ["yes", "no"],
        "structured_outputs",
    )
    assert parse_structured(replica_pb2.StructuredOutput(regex="")).value == ""


def test_the_mapping_onto_vllm_sets_only_what_was_asked() -> None:
    pytest.importorskip("vllm")
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    plain = parse(max_tokens=7).for_vllm()
    expected = SamplingParams(max_tokens=7, output_kind=RequestOutputKind.DELTA)
    for name in (
        "n",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "seed",
        "stop",
        "stop_token_ids",
        "logit_bias",
        "logprobs",
        "prompt_logprobs",
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "structured_outputs",
    ):
        assert getattr(plain, name) == getattr(expected, name), name
    assert plain.output_kind == RequestOutputKind.DELTA

    full = parse(
        max_tokens=7,
        n=2,
        temperature=0.25,
        top_k=5,
        seed=3,
        stop=["END"],
        stop_token_ids=[4],
        logit_bias={9: -5.0},
        logprobs=2,
        prompt_logprobs=1,
        structured={"choice": {"choices": ["a", "b"]}},
    ).for_vllm()
    assert (full.n, full.temperature, full.top_k, full.seed) == (2, 0.25, 5, 3)
    assert (full.stop, full.stop_token_ids, full.logit_bias) == (["END"], [4], {9: -5.0})
    assert (full.logprobs, full.prompt_logprobs) == (2, 1)
    assert full.structured_outputs.choice == ["a", "b"]
    schema = {"type": "object"}
    structured = parse(max_tokens=3, structured={"json_schema": json.dumps(schema)}).for_vllm()
    assert structured.structured_outputs.json == schema


# ----- chat messages and template options ---------------------------------------------------


def test_messages_come_back_in_the_openai_shape() -> None:
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = openai_messages(
        [
            replica_pb2.ChatMessage(role="system", content="be brief"),
            replica_pb2.ChatMessage(role="user", content="hi", name="ann"),
            replica_pb2.ChatMessage(
                role="assistant", content_is_null=True, tool_calls_json=json.dumps(calls)
            ),
            replica_pb2.ChatMessage(role="tool", content="42", tool_call_id="c1"),
        ]
    )
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]


@pytest.mark.parametrize(
    ("message", "field_name"),
    [
        (replica_pb2.ChatMessage(role="", content="x"), "messages[0].role"),
        (replica_pb2.ChatMessage(role="assistant", tool_calls_json="{"), "messages[0].tool_calls"),
        (replica_pb2.ChatMessage(role="user", tool_calls_json="[]"), "messages[0].tool_calls"),
    ],
)
def test_bad_messages_are_refused(message: replica_pb2.ChatMessage, field_name: str) -> None:
    with pytest.raises(InvalidRequest, match=f"^{re.escape(field_name)}:"):
        openai_messages([message])


def test_template_options_merge_as_vllm_merges_them() -> None:
    options = replica_pb2.ChatTemplateOptions
    assert template_kwargs(options()) == {
        "add_generation_prompt": True,
        "continue_final_message": False,
    }
    merged = template_kwargs(
        options(
            add_generation_prompt=False,
            continue_final_message=True,
            kwargs_json=json.dumps(
                {"enable_thinking": False, "add_generation_prompt": True, "x": None}
            ),
        )
    )
    # The explicit options win over the same names in the kwargs; None means unset.
    assert merged == {
        "enable_thinking": False,
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    for bad, field_name in (
        (options(continue_final_message=True), "continue_final_message"),
        (options(kwargs_json="[1]"), "chat_template_kwargs"),
        (options(kwargs_json='{"tokenize": true}'), "chat_template_kwargs"),
        (options(kwargs_json="{"), "chat_template_kwargs"),
    ):
        with pytest.raises(InvalidRequest, match=f"^{field_name}:"):
            template_kwargs(bad)


def test_prompt_source_takes_one_input_and_tools_only_with_messages() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    source = prompt_source(
        replica_pb2.GenerateRequest(
            messages=[replica_pb2.ChatMessage(role="user", content="hi")],
            tools_json=json.dumps(tools),
        )
    )
    assert source.is_chat and source.tools == tools
    assert prompt_source(replica_pb2.GenerateRequest(prompt_token_ids=[3, 4])).prompt_token_ids == [
        3,
        4,
    ]
    with pytest.raises(InvalidRequest, match=r"^prompt: give one of prompt or messages"):
        prompt_source(
            replica_pb2.GenerateRequest(
                prompt="x", messages=[replica_pb2.ChatMessage(role="user", content="y")]
            )
        )
    with pytest.raises(InvalidRequest, match=r"^tools:"):
        prompt_source(replica_pb2.GenerateRequest(prompt="x", tools_json="[]"))
    with pytest.raises(InvalidRequest, match=r"^tools:"):
        prompt_source(
            replica_pb2.GenerateRequest(
                messages=[replica_pb2.ChatMessage(role="user", content="y")], tools_json="{}"
            )
        )
    tokenize = prompt_source(replica_pb2.TokenizeRequest(prompt="x", add_special_tokens=False))
    assert tokenize.add_special_tokens is False


# ----- the fake engine's structured answers -------------------------------------------------

PERSON = {
    "$defs": {
        "Pet": {
            "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer"}},
            "required": ["kind", "legs"],
            "type": "object",
        }
    },
    "properties": {
        "name": {"title": "Name", "type": "string", "minLength": 3},
        "age": {"type": "integer", "minimum": 18},
        "score": {"type": "number", "exclusiveMinimum": 0},
        "member": {"type": "boolean"},
        "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "pet": {"$ref": "#/$defs/Pet"},
        "note": {"type": "string"},
    },
    "required": ["name", "age", "score", "member", "nickname", "tags", "pet"],
    "title": "Person",
    "type": "object",
}


def test_the_fake_json_is_a_minimal_valid_instance() -> None:
    assert minimal_instance(PERSON) == {
        "name": "aaa",
        "age": 18,
        "score": 0.5,
        "member": False,
        "nickname": "a",
        "tags": ["a"],
        "pet": {"kind": "cat", "legs": 0},
    }
    assert minimal_instance({"type": "array"}) == []
    assert minimal_instance({"const": 7}) == 7
    assert minimal_instance({"type": ["null", "integer"]}) == 0
    with pytest.raises(InvalidRequest, match=r"^response_format:"):
        minimal_instance({"$ref": "#/$defs/Missing"})


def test_the_fake_answers_each_constraint_or_refuses_it() -> None:
    def text(**kind: Any) -> str:
        return structured_text(parse_structured(replica_pb2.StructuredOutput(**kind)))

    assert json.loads(text(json_schema=json.dumps(PERSON)))["pet"] == {"kind": "cat", "legs": 0}
    assert text(
        json_schema='{"type": "object", "required": ["a"]}', disable_any_whitespace=True
    ) == ('{"a":null}')
    assert text(json_object=True) == "{}"
    assert text(choice=replica_pb2.ChoiceList(choices=["yes", "no"])) == "yes"
    for kind in ({"regex": "a+"}, {"grammar": "root ::= 'a'"}, {"structural_tag": "{}"}):
        with pytest.raises(InvalidRequest, match=r"^structured_outputs: the fake engine cannot"):
            text(**kind)
