"""Forced tool calls as constrained decoding: the JSON schema sent to the replica, and the
generated JSON read back into OpenAI `tool_calls`, whole or as streaming deltas.

No model-specific tool parser is needed: the replica constrains the output to
a JSON schema built the way vLLM's server builds it for the same request
(`vllm.tool_parsers.utils.get_json_schema_from_tools`), so the text is
exactly the JSON to read back:

- a named function (`tool_choice: {"type": "function", "function": {"name": N}}`):
  the output is N's arguments object;
- `tool_choice: "required"`: the output is an array of
  `{"name": ..., "parameters": {...}}`, at least one, at most one when
  `parallel_tool_calls` is false.

The shapes read back are vLLM's: ids `chatcmpl-tool-<hex>`, `type: function`,
`arguments` as a JSON string (for "required", re-encoded as Python's
`json.dumps(parameters, ensure_ascii=False)`, as vLLM does); when streaming,
the first delta of a call carries its id, type, name and the argument text
so far, later deltas only new argument text. `tool_choice: "auto"` needs a
model-specific parser, which no model here has: it is refused, as vLLM's
server refuses it without `--tool-call-parser`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from gateway.errors import ApiError, quote


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _params_or_empty(params: dict[str, Any] | None) -> dict[str, Any]:
    return params if params else {"type": "object", "properties": {}}


def named_tool_schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The output schema of a forced call of one function: its arguments object."""
    return _params_or_empty(parameters)


def required_tools_schema(
    functions: list[tuple[str, dict[str, Any] | None]], parallel_tool_calls: bool
) -> dict[str, Any]:
    """The output schema of `tool_choice: "required"`: an array of calls of any of `functions`.

    `$defs` of every function's parameters are hoisted to the top (one name,
    one schema), as vLLM does.
    """
    defs: dict[str, Any] = {}
    variants: list[dict[str, Any]] = []
    for name, params in functions:
        if params is not None:
            params = dict(params)
            own = params.pop("$defs", {})
            if not isinstance(own, dict):
                raise ApiError(
                    400,
                    f"tools: `$defs` in the parameters of tool {quote(repr(name))} "
                    "must be an object",
                    param="tools",
                )
            for key, value in own.items():
                if key in defs and defs[key] != value:
                    raise ApiError(
                        400,
                        f"tools: definition {quote(repr(key))} has several schemas across tools",
                        param="tools",
                    )
                defs[key] = value
        variants.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "parameters": _params_or_empty(params),
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": variants},
    }
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": tool_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def parse_named(text: str, name: str) -> list[dict[str, Any]]:
    """The tool call in a forced named call's output; none when the output is blank."""
    if not text.strip():
        return []
    return [_call(name, text)]


def parse_required(text: str, parallel_tool_calls: bool) -> list[dict[str, Any]]:
    """The tool calls in a `required` output; none when it is not an array of calls.

    The output of a run cut short by max_tokens is not valid JSON: no calls,
    as in vLLM.
    """
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list) or not all(
        isinstance(it, dict) and isinstance(it.get("name"), str) for it in items
    ):
        return []
    calls = [
        _call(it["name"], json.dumps(it.get("parameters"), ensure_ascii=False)) for it in items
    ]
    return calls if parallel_tool_calls else calls[:1]


@dataclass(slots=True)
class _Span:
    """One element of a `required` array: its name once complete, where its parameters are."""

    name: str | None = None
    name_end: int | None = None
    args_start: int | None = None
    args_end: int | None = None

    def ready_at(self, length: int) -> bool:
        return (
            self.name is not None
            and self.name_end is not None
            and self.name_end <= length
            and self.args_start is not None
            and self.args_start < length
        )

    @property
    def ready(self) -> bool:
        return self.name is not None and self.args_start is not None


def _scan(text: str) -> list[_Span]:
    """Every call of a (possibly partial) `required` array, by one string-aware pass.

    Offsets are prefix-stable: scanning a prefix gives the same spans cut at
    that prefix, so what an earlier text revealed is read off the current one.
    """
    spans: list[_Span] = []
    depth = 0
    in_string = escaped = False
    string_start = value_start = 0
    cur: _Span | None = None
    expect = "key"
    key: str | None = None

    def end_value(pos: int) -> None:
        nonlocal expect
        assert cur is not None
        if key == "parameters":
            cur.args_end = pos
        elif key == "name" and expect == "string":
            try:
                cur.name = json.loads(text[value_start:pos])
                cur.name_end = pos
            except ValueError:
                cur.name = None
        expect = "after"

    def start_value(pos: int, state: str) -> None:
        nonlocal expect, value_start
        assert cur is not None
        value_start = pos
        if key == "parameters":
            cur.args_start = pos
        expect = state

    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 2 and cur is not None:
                    if expect == "key":
                        key = text[string_start + 1 : i]
                        expect = "colon"
                    elif expect == "string":
                        end_value(i + 1)
            continue
        if ch == '"':
            in_string = True
            string_start = i
            if depth == 2 and cur is not None and expect == "value":
                start_value(i, "string")
            continue
        if ch in "{[":
            if (depth == 0 and ch != "[") or (depth == 1 and ch != "{"):
                return spans
            if depth == 1:
                cur = _Span()
                spans.append(cur)
                expect, key = "key", None
            elif depth == 2 and cur is not None and expect == "value":
                start_value(i, "container")
            depth += 1
            continue
        if ch in "}]":
            if depth == 2 and cur is not None and expect == "scalar":
                end_value(i)
            depth -= 1
            if depth == 2 and cur is not None and expect == "container":
                end_value(i + 1)
            elif depth == 1:
                cur = None
            elif depth <= 0:
                return spans
            continue
        if depth != 2 or cur is None:
            continue
        if ch == ":":
            if expect == "colon":
                expect = "value"
        elif ch == ",":
            if expect == "scalar":
                end_value(i)
            expect, key = "key", None
        elif ch.isspace():
            if expect == "scalar":
                end_value(i)
        elif expect == "value":
            start_value(i, "scalar")
    return spans


@dataclass(slots=True)
class ToolCallStream:
    """Turns one choice's streamed text into tool-call deltas (lists of `DeltaToolCall` dicts)."""

    mode: str
    """`named` or `required`."""
    name: str = ""
    parallel: bool = True
    text: str = ""
    started: bool = False
    """A call was announced (its id and name sent)."""

    def feed(self, delta: str) -> list[dict[str, Any]] | None:
        """The tool-call deltas for `delta`, or None when it reveals nothing new."""
        if self.mode == "named":
            return self._named(delta)
        previous = self.text
        self.text += delta
        calls: list[dict[str, Any]] = []
        for index, span in enumerate(_scan(self.text)):
            if not span.ready:
                break
            assert span.args_start is not None
            end = span.args_end if span.args_end is not None else len(self.text)
            if span.ready_at(len(previous)):
                new = self.text[min(end, len(previous)) : end]
                if new:
                    calls.append({"index": index, "function": {"name": None, "arguments": new}})
                continue
            self.started = True
            calls.append(
                {
                    "id": tool_call_id(),
                    "type": "function",
                    "index": index,
                    "function": {"name": span.name, "arguments": self.text[span.args_start : end]},
                }
            )
        if not self.parallel:
            calls = [c for c in calls if c["index"] == 0]
        return calls or None

    def _named(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        if self.started:
            return [{"index": 0, "function": {"arguments": delta}}]
        self.started = True
        return [
            {
                "id": tool_call_id(),
                "type": "function",
                "index": 0,
                "function": {"name": self.name, "arguments": delta},
            }
        ]
