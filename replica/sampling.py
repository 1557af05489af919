"""A request's `SamplingParams` message, validated once, in the engine's terms.

`parse_sampling` turns the wire message into a `Sampling` (plain Python
values, engine defaults filled in) or raises `InvalidRequest` naming the field
the way the OpenAI API names it, so the gateway can answer 400 with it. The
checks are the ones vLLM's `SamplingParams` makes, done here so that both
engines refuse the same requests with the same words, and so that a request
never reaches an engine that would fail it after the stream has started.

`Sampling.for_vllm` is the one mapping onto vLLM's own `SamplingParams`;
a request that sets nothing gets exactly what the replica sent before this
message existed (vLLM's defaults: temperature 1, top_p 1, no penalties).

Assumptions: token ids are checked against the model's vocabulary size and
logprob counts against the engine's `max_logprobs` (vLLM's default is 20),
both given by the engine in `Limits`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from protos import replica_pb2


class InvalidRequest(ValueError):
    """A request the engine cannot run; the message starts with the field and a colon."""


MAX_STOP = 16
"""Stop strings per request (vLLM's server allows 4 by default; the gateway may say fewer)."""

StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]


@dataclass(frozen=True, slots=True)
class Limits:
    """What the engine allows, for validation."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int = 20
    max_n: int = 256


@dataclass(slots=True)
class Structured:
    """One structured-output constraint; `value` is the parsed schema for `json`."""

    kind: StructuredKind
    value: Any
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @property
    def field_name(self) -> str:
        """How the OpenAI API (or vLLM's extension of it) names this constraint."""
        return "response_format" if self.kind in ("json", "json_object") else "structured_outputs"


@dataclass(slots=True)
class Sampling:
    """Everything that shapes generation, validated; None means the engine's default."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured: Structured | None = None

    def for_vllm(self) -> Any:
        """vLLM's `SamplingParams` for this request, streaming one delta per step.

        Only what the request set is passed, so everything else keeps vLLM's
        own defaults. Imported lazily: the fake engine never loads vLLM.
        """
        from vllm.sampling_params import (
            RequestOutputKind,
            SamplingParams,
            StructuredOutputsParams,
        )

        params: dict[str, Any] = {
            "n": self.n,
            "max_tokens": self.max_tokens,
            "min_tokens": self.min_tokens,
            "seed": self.seed,
            "stop": self.stop or None,
            "stop_token_ids": self.stop_token_ids or None,
            "logit_bias": self.logit_bias or None,
            "ignore_eos": self.ignore_eos,
            "logprobs": self.logprobs,
            "prompt_logprobs": self.prompt_logprobs,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "output_kind": RequestOutputKind.DELTA,
        }
        for name in (*_OPTIONAL_FLOATS, "top_k"):
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        if self.structured is not None:
            s = self.structured
            params["structured_outputs"] = StructuredOutputsParams(
                **{_VLLM_STRUCTURED_FIELD[s.kind]: s.value},
                disable_any_whitespace=s.disable_any_whitespace,
                disable_additional_properties=s.disable_additional_properties,
                whitespace_pattern=s.whitespace_pattern,
            )
        return SamplingParams(**params)


_OPTIONAL_FLOATS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)

_VLLM_STRUCTURED_FIELD: dict[StructuredKind, str] = {
    "json": "json",
    "json_object": "json_object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "structural_tag": "structural_tag",
}


def parse_sampling(
    message: replica_pb2.SamplingParams, limits: Limits, prompt_len: int, chat: bool
) -> Sampling:
    """Validate `message` for a prompt of `prompt_len` tokens; raises InvalidRequest.

    `chat` says which API's names to use where they differ: the chat API's
    `top_logprobs` is the completions API's `logprobs`.
    """
    logprobs_name = "top_logprobs" if chat else "logprobs"
    s = Sampling(
        n=message.n or 1,
        min_tokens=message.min_tokens,
        stop=list(message.stop),
        stop_token_ids=list(message.stop_token_ids),
        logit_bias={token: _exact(bias) for token, bias in message.logit_bias.items()},
        ignore_eos=message.ignore_eos,
        include_stop_str_in_output=message.include_stop_str_in_output,
    )
    for name in _OPTIONAL_FLOATS:
        if message.HasField(name):
            setattr(s, name, _exact(getattr(message, name)))
    for name in ("top_k", "seed", "logprobs", "prompt_logprobs"):
        if message.HasField(name):
            setattr(s, name, getattr(message, name))
    if message.HasField("skip_special_tokens"):
        s.skip_special_tokens = message.skip_special_tokens
    if message.HasField("spaces_between_special_tokens"):
        s.spaces_between_special_tokens = message.spaces_between_special_tokens

    if not 1 <= s.n <= limits.max_n:
        raise InvalidRequest(f"n: must be between 1 and {limits.max_n}, got {message.n}")
    if s.n > 1 and s.temperature == 0:
        # vLLM refuses it too (it raises temperatures in (0, 0.01) to 0.01, so only 0 is
        # greedy): greedy choices would all be the same.
        raise InvalidRequest(f"n: must be 1 when using greedy sampling (temperature 0), got {s.n}")
    s.max_tokens = _max_tokens(message.max_tokens, prompt_len, limits.max_model_len)
    if not 0 <= s.min_tokens <= s.max_tokens:
        raise InvalidRequest(
            f"min_tokens: must be between 0 and max_tokens ({s.max_tokens}), got {s.min_tokens}"
        )
    _check_ranges(s)
    if len(s.stop) > MAX_STOP or any(not x for x in s.stop):
        raise InvalidRequest(f"stop: at most {MAX_STOP} non-empty strings")
    _check_token_ids("stop_token_ids", s.stop_token_ids, limits.vocab_size)
    _check_token_ids("logit_bias", list(s.logit_bias), limits.vocab_size)
    for token, bias in s.logit_bias.items():
        if not math.isfinite(bias):
            raise InvalidRequest(f"logit_bias: bias of token {token} must be a finite number")
        # vLLM clamps to [-100, 100] rather than refusing.
        s.logit_bias[token] = min(100.0, max(-100.0, bias))
    for api_name, value in ((logprobs_name, s.logprobs), ("prompt_logprobs", s.prompt_logprobs)):
        if value is not None and not 0 <= value <= limits.max_logprobs:
            raise InvalidRequest(
                f"{api_name}: must be between 0 and {limits.max_logprobs}, got {value}"
            )
    if message.HasField("structured"):
        s.structured = parse_structured(message.structured)
    return s


def _exact(value: float) -> float:
    """The decimal the client most likely wrote: the wire's float32 0.7 is 0.699999988...,
    and vLLM's own server samples with the double 0.7."""
    return float(f"{value:.7g}")


def _max_tokens(asked: int, prompt_len: int, max_model_len: int) -> int:
    """0 means as many as fit in the context, as vLLM's server does when none is given."""
    room = max_model_len - prompt_len
    if asked == 0:
        return room
    if asked < 0:
        raise InvalidRequest(f"max_tokens: must be at least 1, got {asked}")
    if asked > room:
        raise InvalidRequest(
            f"max_tokens: {asked} plus the prompt's {prompt_len} tokens is above "
            f"the context of {max_model_len} tokens"
        )
    return asked


def _check_ranges(s: Sampling) -> None:
    """vLLM's own bounds (`SamplingParams._verify_args`), with the OpenAI field names."""
    checks: list[tuple[str, float | None, float, float, str]] = [
        ("temperature", s.temperature, 0.0, 2.0, "[0, 2]"),
        ("top_p", s.top_p, 0.0, 1.0, "(0, 1]"),
        ("min_p", s.min_p, 0.0, 1.0, "[0, 1]"),
        ("presence_penalty", s.presence_penalty, -2.0, 2.0, "[-2, 2]"),
        ("frequency_penalty", s.frequency_penalty, -2.0, 2.0, "[-2, 2]"),
    ]
    for name, value, low, high, shown in checks:
        if value is None:
            continue
        below = value <= low if name == "top_p" else value < low
        if not math.isfinite(value) or below or value > high:
            raise InvalidRequest(f"{name}: must be in {shown}, got {value:g}")
    if s.repetition_penalty is not None and not (
        math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0
    ):
        raise InvalidRequest(
            f"repetition_penalty: must be greater than 0, got {s.repetition_penalty:g}"
        )
    if s.top_k is not None and s.top_k < -1:
        raise InvalidRequest(f"top_k: must be 0 or -1 (all tokens) or at least 1, got {s.top_k}")


def _check_token_ids(name: str, ids: list[int], vocab_size: int) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InvalidRequest(
            f"{name}: token id(s) {bad[:8]} out of the vocabulary of {vocab_size} tokens"
        )


def parse_structured(message: replica_pb2.StructuredOutput) -> Structured:
    """The constraint, with a JSON schema parsed (refused when it is not a JSON object)."""
    kind = message.WhichOneof("kind")
    common = {
        "disable_any_whitespace": message.disable_any_whitespace,
        "disable_additional_properties": message.disable_additional_properties,
        "whitespace_pattern": message.whitespace_pattern or None,
    }
    if kind == "json_schema":
        try:
            schema = json.loads(message.json_schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(
                f"response_format: the JSON schema is not valid JSON: {exc}"
            ) from None
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format: the JSON schema must be a JSON object")
        return Structured("json", schema, **common)  # type: ignore[arg-type]
    if kind == "json_object":
        if not message.json_object:
            raise InvalidRequest("response_format: json_object must be true when given")
        return Structured("json_object", True, **common)  # type: ignore[arg-type]
    if kind == "choice":
        choices = list(message.choice.choices)
        if not choices:
            raise InvalidRequest("structured_outputs: choice must not be empty")
        return Structured("choice", choices, **common)  # type: ignore[arg-type]
    if kind in ("regex", "grammar", "structural_tag"):
        text: str = getattr(message, kind)
        if kind != "regex" and not text.strip():
            raise InvalidRequest(f"structured_outputs: {kind} must not be empty")
        if "\x00" in text:
            raise InvalidRequest(f"structured_outputs: {kind} must not contain a NUL character")
        return Structured(kind, text, **common)  # type: ignore[arg-type]
    raise InvalidRequest("structured_outputs: no constraint given")
