"""Forced tool calls: the schemas sent to the replica, the calls read back whole and streamed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import ApiError
from gateway.tool_calls import (
    ToolCallStream,
    named_tool_schema,
    parse_named,
    parse_required,
    required_tools_schema,
)

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_schemas_are_built_as_vllm_builds_them() -> None:
    assert named_tool_schema(CITY) == CITY
    assert named_tool_schema(None) == {"type": "object", "properties": {}}
    schema = required_tools_schema([("weather", CITY), ("time", None)], parallel_tool_calls=True)
    assert schema == {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "anyOf": [
                {
                    "properties": {
                        "name": {"type": "string", "enum": ["weather"]},
                        "parameters": CITY,
                    },
                    "required": ["name", "parameters"],
                },
                {
                    "properties": {
                        "name": {"type": "string", "enum": ["time"]},
                        "parameters": {"type": "object", "properties": {}},
                    },
                    "required": ["name", "parameters"],
                },
            ],
        },
    }
    assert required_tools_schema([("time", None)], parallel_tool_calls=False)["maxItems"] == 1


def test_defs_are_hoisted_and_conflicts_refused() -> None:
    with_defs = {"type": "object", "$defs": {"Unit": {"enum": ["C", "F"]}}}
    schema = required_tools_schema([("a", with_defs), ("b", with_defs)], True)
    assert schema["$defs"] == {"Unit": {"enum": ["C", "F"]}}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    other = {"type": "object", "$defs": {"Unit": {"enum": ["K"]}}}
    with pytest.raises(ApiError) as err:
        required_tools_schema([("a", with_defs), ("b", other)], True)
    assert err.value.param == "tools"


def test_whole_outputs_become_tool_calls() -> None:
    (call,) = parse_named('{"city": "Paris"}', "weather")
    assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}
    assert parse_named("  ", "weather") == []
    text = (
        '[{"name": "weather", "parameters": {"city":"Zürich"}}, {"name": "time", "parameters": {}}]'
    )
    first, second = parse_required(text, parallel_tool_calls=True)
    assert first["function"] == {"name": "weather", "arguments": '{"city": "Zürich"}'}
    assert second["function"] == {"name": "time", "arguments": "{}"}
    assert first["id"] != second["id"]
    assert len(parse_required(text, parallel_tool_calls=False)) == 1
    assert parse_required('[{"name": "weather", "parameters": {"ci', True) == []  # cut short
    assert parse_required('{"name": "x"}', True) == []


def stream(mode: str, pieces: list[str], **kwargs: Any) -> list[list[dict[str, Any]]]:
    s = ToolCallStream(mode, **kwargs)
    return [d for d in (s.feed(p) for p in pieces) if d is not None]


def test_a_named_call_streams_its_name_once_then_argument_text() -> None:
    deltas = stream("named", ['{"ci', 'ty": "Pa', 'ris"}'], name="weather")
    first, *rest = deltas
    assert first[0]["id"].startswith("chatcmpl-tool-") and first[0]["type"] == "function"
    assert first[0]["function"] == {"name": "weather", "arguments": '{"ci'}
    assert [d[0] for d in rest] == [
        {"index": 0, "function": {"arguments": 'ty": "Pa'}},
        {"index": 0, "function": {"arguments": 'ris"}'}},
    ]


def test_required_calls_stream_as_their_parameters_appear() -> None:
    text = (
        '[{"name": "weather", "parameters": {"city": "Paris"}}, {"name": "time", "parameters": {}}]'
    )
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    deltas = stream("required", pieces)
    announced = [c for d in deltas for c in d if "id" in c]
    assert [(c["index"], c["function"]["name"]) for c in announced] == [(0, "weather"), (1, "time")]
    arguments: dict[int, str] = {}
    for d in deltas:
        for c in d:
            arguments[c["index"]] = arguments.get(c["index"], "") + c["function"]["arguments"]
            if "id" not in c:
                assert c["function"]["name"] is None  # vLLM sends null after the first delta
    assert json.loads(arguments[0]) == {"city": "Paris"} and json.loads(arguments[1]) == {}
    single = stream("required", pieces, parallel=False)
    assert {c["index"] for d in single for c in d} == {0}
