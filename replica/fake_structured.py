"""Structured outputs for the fake engine: the smallest text that meets the constraint.

The fake engine cannot search a grammar, but tests of the gateway need
answers that have the right shape. So it answers a constraint with one fixed,
minimal text:

- `json` (a JSON schema): a minimal instance valid against the schema: an
  object with its required properties only, strings "a" (repeated up to
  minLength), numbers and integers 0 (or their minimum), booleans false,
  null for "null", arrays with minItems minimal items, the first value of an
  enum, the const, the first branch of anyOf/oneOf, local `$ref`s followed
  (`#/$defs/...`, `#/definitions/...`);
- `json_object`: `{}`;
- `choice`: the first choice;
- `regex`, `grammar`, `structural_tag`: refused with InvalidRequest (the fake
  engine cannot produce them).
"""

from __future__ import annotations

import json
import math
from typing import Any

from replica.sampling import InvalidRequest, Structured

_MAX_DEPTH = 32


def structured_text(structured: Structured) -> str:
    """The text the fake engine answers `structured` with; raises InvalidRequest."""
    if structured.kind == "json":
        instance = minimal_instance(structured.value)
        separators = (",", ":") if structured.disable_any_whitespace else (", ", ": ")
        return json.dumps(instance, separators=separators)
    if structured.kind == "json_object":
        return "{}"
    if structured.kind == "choice":
        return str(structured.value[0])
    raise InvalidRequest(
        f"{structured.field_name}: the fake engine cannot constrain output to a "
        f"{structured.kind.replace('_', ' ')}; use the vllm engine"
    )


def minimal_instance(schema: dict[str, Any]) -> Any:
    """A minimal JSON value valid against `schema` (see the module docstring)."""
    return _instance(schema, schema, 0)


def _instance(node: Any, root: dict[str, Any], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise InvalidRequest("response_format: the JSON schema nests too deeply")
    if node is True or node is None or node == {}:
        return None
    if not isinstance(node, dict):
        raise InvalidRequest("response_format: the JSON schema has a part that is not an object")
    if "$ref" in node:
        return _instance(_resolve(node["$ref"], root), root, depth + 1)
    if "const" in node:
        return node["const"]
    if node.get("enum"):
        return node["enum"][0]
    for key in ("anyOf", "oneOf"):
        if node.get(key):
            return _instance(node[key][0], root, depth + 1)
    if node.get("allOf"):
        merged: dict[str, Any] = {}
        for part in node["allOf"]:
            part = _resolve(part["$ref"], root) if "$ref" in part else part
            for k, v in part.items():
                if k in ("properties",) and k in merged:
                    merged[k] = {**merged[k], **v}
                elif k == "required" and k in merged:
                    merged[k] = [*merged[k], *v]
                else:
                    merged[k] = v
        return _instance(merged, root, depth + 1)
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in node else "null"
    if kind == "object":
        properties = node.get("properties", {})
        return {
            name: _instance(properties.get(name, {}), root, depth + 1)
            for name in node.get("required", [])
        }
    if kind == "array":
        count = int(node.get("minItems", 0))
        items = node.get("items", {})
        return [_instance(items, root, depth + 1) for _ in range(count)]
    if kind == "string":
        return "a" * max(1, int(node.get("minLength", 1)))
    if kind in ("integer", "number"):
        return _number(node, integer=kind == "integer")
    if kind == "boolean":
        return False
    return None


def _number(node: dict[str, Any], integer: bool) -> int | float:
    low = node.get("minimum")
    exclusive = node.get("exclusiveMinimum")
    if isinstance(exclusive, (int, float)) and not isinstance(exclusive, bool):
        low = exclusive + 1 if integer else exclusive + 0.5
    if low is None or low <= 0:
        high = node.get("maximum")
        if isinstance(high, (int, float)) and high < 0:
            return math.floor(high) if integer else high
        return 0
    return math.ceil(low) if integer else low


def _resolve(ref: str, root: dict[str, Any]) -> Any:
    if not ref.startswith("#"):
        raise InvalidRequest(f"response_format: only local $refs are supported, got {ref!r}")
    node: Any = root
    for part in filter(None, ref[1:].split("/")):
        if not isinstance(node, dict) or part not in node:
            raise InvalidRequest(f"response_format: $ref {ref!r} points nowhere")
        node = node[part]
    return node
