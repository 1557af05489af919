"""The request table of the OpenAI conformance test: the same requests go to vLLM's server and ours.

Each `Case` is one HTTP request. Greedy cases (temperature 0, or top_k 1) must
give the same text on both servers; sampled cases with a seed are compared
exactly only when vLLM itself gives the same answer twice (`seeded`); the
others compare shapes only. Token ids below belong to the bundled
SmolLM2-135M-Instruct tokenizer (as its `/tokenize` answers them).

Assumptions: both servers run the same converted model with the same dtype,
context length, KV-cache size and engine seed, and serve it as `smollm2`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

MODEL = "smollm2"
QUESTION = "What is the capital of France?"

Compare = Literal["exact", "seeded", "shape", "status", "ours_refuses"]
"""How the two answers are compared:

- exact: status, shape and every value except the allow-listed ones;
- seeded: exact when vLLM answers the request twice the same, else shape;
- shape: status and shape (keys and value types, recursively);
- status: the status only (see `Case.note` for why the bodies differ);
- ours_refuses: a written divergence (see `Case.note`): ours must answer 400
  naming `Case.field`, whatever vLLM does.
"""


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: dict[str, Any] | None = None
    """JSON body (None: a GET, or `raw` is sent)."""
    method: Literal["GET", "POST"] = "POST"
    compare: Compare = "exact"
    raw: bytes | None = None
    """Sent as is with Content-Type application/json (malformed bodies)."""
    field: str = ""
    """For ours_refuses: the field our error must name."""
    note: str = ""

    @property
    def stream(self) -> bool:
        return bool(self.body and self.body.get("stream"))


# Token ids of the bundled tokenizer (SmolLM2, GPT-2 style byte BPE).
TOKEN_PARIS = 7042
"""' Paris', the seventh token of the greedy answer to QUESTION."""
TOKEN_PERIOD = 30
"""'.'"""
TOKEN_HELLO = 19556
"""'Hello'"""
TOKENS_HELLO_WORLD = [19556, 905]
"""'Hello world'"""
TOKEN_OUT_OF_VOCAB = 10_000_000

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}


def chat(content: str = QUESTION, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 12,
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not _DROP}


def completion(prompt: Any = "The capital of France is", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 10}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not _DROP}


class _Drop:
    """Marks a default field to leave out of a body."""


_DROP: Any = _Drop()

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def both(case: Case) -> list[Case]:
    """The case as sent, then streamed (with usage, as clients usually ask)."""
    assert case.body is not None
    streamed = {**case.body, "stream": True}
    return [case, replace(case, name=case.name + "-stream", body=streamed)]


# fmt: off
def _cases() -> list[Case]:
    c: list[Case] = []
    # Plain generation.
    c += both(Case("chat", CHAT, chat()))
    c += both(Case("chat-no-max-tokens", CHAT, chat(max_tokens=_DROP)))
    c += both(Case("chat-system-and-parts", CHAT, chat(
        messages=[
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        ],
    )))
    c += both(Case("completion", COMPLETIONS, completion()))
    c += both(Case("completion-list-prompt", COMPLETIONS, completion(prompt=["Once upon a time"])))
    c += both(Case("chat-max-completion-tokens", CHAT, chat(
        max_tokens=_DROP, max_completion_tokens=4
    )))
    c += both(Case("completion-max-tokens", COMPLETIONS, completion(max_tokens=3)))
    # Stops.
    c += both(Case("chat-stop-string", CHAT, chat(stop=["Paris"], max_tokens=16)))
    c += both(Case("chat-stop-include", CHAT, chat(
        stop=["Paris"], include_stop_str_in_output=True, max_tokens=16
    )))
    c += both(Case("completion-stop-list", COMPLETIONS, completion(
        prompt="1, 2, 3, 4,", stop=[" 7", "9"], max_tokens=16
    )))
    c += both(Case("chat-stop-token-ids", CHAT, chat(stop_token_ids=[TOKEN_PARIS], max_tokens=16)))
    # Several choices.
    # vLLM refuses n > 1 with greedy sampling ("n must be 1 when using greedy sampling").
    c += both(Case("chat-n2-greedy", CHAT, chat(n=2, max_tokens=6), field="n"))
    c += both(Case("chat-n2-seeded", CHAT, chat(n=2, temperature=1.0, seed=7, max_tokens=6),
                   compare="seeded"))
    c += both(Case("completion-n2-seeded", COMPLETIONS, completion(
        n=2, temperature=1.0, seed=5, max_tokens=5
    ), compare="seeded"))
    c.append(Case("chat-n3-top-k-1", CHAT, chat(n=3, temperature=1.0, top_k=1, max_tokens=5)))
    # Sampling settings.
    penalties = {"presence_penalty": 1.5, "frequency_penalty": 1.0}
    c += both(Case("chat-presence-frequency", CHAT, chat(
        "List five fruits.", max_tokens=16, **penalties
    )))
    c += both(Case("chat-repetition-penalty", CHAT, chat(
        "List five fruits.", max_tokens=16, repetition_penalty=1.3
    )))
    c += both(Case("completion-penalties", COMPLETIONS, completion(
        prompt="a a a a", max_tokens=8, repetition_penalty=1.5, **penalties
    )))
    c += both(Case("chat-top-k-1", CHAT, chat(temperature=1.0, top_k=1)))
    c.append(Case("chat-min-p", CHAT, chat(temperature=1.0, min_p=0.5, seed=3), compare="seeded"))
    c.append(Case("chat-top-p-seed", CHAT, chat(temperature=0.8, top_p=0.9, seed=11),
                  compare="seeded"))
    c += both(Case("chat-seed", CHAT, chat("Tell me a story.", temperature=1.0, seed=1234),
                   compare="seeded"))
    c.append(Case("completion-seed", COMPLETIONS, completion(temperature=1.0, seed=99),
                  compare="seeded"))
    c.append(Case("chat-sampled-no-seed", CHAT, chat("Tell me a story.", temperature=1.0),
                  compare="shape"))
    c += both(Case("chat-logit-bias", CHAT, chat(logit_bias={str(TOKEN_HELLO): 100}, max_tokens=4)))
    c += both(Case("chat-logit-bias-ban", CHAT, chat(logit_bias={str(TOKEN_PARIS): -100})))
    c += both(Case("completion-logit-bias", COMPLETIONS, completion(
        logit_bias={str(TOKEN_PERIOD): 100}, max_tokens=3
    )))
    c += both(Case("chat-min-tokens", CHAT, chat("Say yes.", min_tokens=8, max_tokens=10)))
    # Log probabilities.
    c += both(Case("chat-logprobs", CHAT, chat(logprobs=True, top_logprobs=3, max_tokens=5)))
    c.append(Case("chat-logprobs-no-top", CHAT, chat(logprobs=True, max_tokens=4)))
    c += both(Case("completion-logprobs", COMPLETIONS, completion(logprobs=2, max_tokens=4)))
    c += both(Case("completion-echo", COMPLETIONS, completion(echo=True, max_tokens=4)))
    c += both(Case("completion-echo-logprobs", COMPLETIONS, completion(
        echo=True, logprobs=1, max_tokens=3
    )))
    c += both(Case("completion-echo-token-ids", COMPLETIONS, completion(
        prompt=TOKENS_HELLO_WORLD, echo=True, logprobs=1, max_tokens=3
    )))
    c += both(Case("completion-echo-return-token-ids", COMPLETIONS, completion(
        echo=True, return_token_ids=True, max_tokens=3
    )))
    # Structured outputs.
    c += both(Case("chat-json-object", CHAT, chat(
        "Give the capital of France as JSON.", response_format={"type": "json_object"},
        max_tokens=16,
    )))
    c += both(Case("chat-json-schema", CHAT, chat(
        "Give the capital of France as JSON.",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True},
        },
        max_tokens=20,
    )))
    c += both(Case("chat-choice", CHAT, chat(
        structured_outputs={"choice": ["Paris", "London", "Berlin"]}
    )))
    c += both(Case("chat-regex", CHAT, chat(structured_outputs={"regex": "[A-Z][a-z]{2,8}"})))
    c.append(Case("completion-choice", COMPLETIONS, completion(
        structured_outputs={"choice": ["Paris", "Lyon"]}
    )))
    c.append(Case("completion-json-schema", COMPLETIONS, completion(
        prompt="The city as JSON:", structured_outputs={"json": CITY_SCHEMA}, max_tokens=16
    )))
    # Tools.
    ask_weather = "What is the weather in Paris?"
    tools = [WEATHER_TOOL]
    c += both(Case("chat-tools-none", CHAT, chat(ask_weather, tools=tools, tool_choice="none")))
    c += both(Case("chat-tools-required", CHAT, chat(
        ask_weather, tools=tools, tool_choice="required", max_tokens=40
    )))
    c += both(Case("chat-tools-named", CHAT, chat(
        ask_weather, tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=30,
    )))
    c += both(Case("chat-tools-required-parallel-false", CHAT, chat(
        "Weather and time in Paris?", tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
        parallel_tool_calls=False, max_tokens=40,
    )))
    c.append(Case("chat-tool-result-turn", CHAT, chat(
        messages=[
            {"role": "user", "content": ask_weather},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
        ],
        tools=tools, tool_choice="none", max_tokens=16,
    )))
    # "auto" needs a model-specific parser; none is configured for this model.
    auto_note = (
        "The reference runs with --enable-auto-tool-choice (vLLM 0.32 refuses required and "
        "named tool_choice without it) and answers auto with the pythonic parser; vLLM "
        "without a parser, like our deployment, answers 400 '\"auto\" tool choice requires "
        "--enable-auto-tool-choice and --tool-call-parser to be set'."
    )
    for name, body in [
        ("chat-tools-auto", chat(ask_weather, tools=tools, tool_choice="auto")),
        ("chat-tools-auto-stream", chat(ask_weather, tools=tools, tool_choice="auto",
                                        stream=True)),
        ("chat-tools-default-choice", chat(ask_weather, tools=tools)),
    ]:
        c.append(Case(name, CHAT, body, compare="ours_refuses", field="tool_choice",
                      note=auto_note))
    # Stream options.
    c.append(Case("chat-stream-usage", CHAT, chat(
        stream=True, stream_options={"include_usage": True}
    )))
    c.append(Case("chat-stream-continuous-usage", CHAT, chat(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
        max_tokens=6,
    )))
    c.append(Case("completion-stream-usage", COMPLETIONS, completion(
        stream=True, stream_options={"include_usage": True}
    )))
    c.append(Case("completion-stream-continuous-usage", COMPLETIONS, completion(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
        max_tokens=5,
    )))
    c.append(Case("chat-stream-n2-usage", CHAT, chat(
        n=2, temperature=1.0, seed=2, max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    ), compare="seeded"))
    c += both(Case("completion-token-ids-prompt", COMPLETIONS, completion(
        prompt=TOKENS_HELLO_WORLD, max_tokens=4
    )))
    c += both(Case("completion-two-prompts", COMPLETIONS, completion(
        prompt=["The capital of France is", "Once upon a time"], max_tokens=4
    ), compare="ours_refuses", field="prompt", note=(
        "A batch of prompts in one request is refused with a 400 naming `prompt`: the gateway "
        "admits, routes, retries and cancels per request, and a batch would take one admission "
        "slot for many generations on one replica. Send one request per prompt.")))
    c.append(Case("completion-default-max-tokens", COMPLETIONS, completion(max_tokens=_DROP)))
    c.append(Case("chat-stop-as-string", CHAT, chat(stop="Paris")))
    c.append(Case("chat-both-max-tokens", CHAT, chat(max_tokens=3, max_completion_tokens=5)))
    c.append(Case("chat-usage-off", CHAT, chat(
        stream=True, stream_options={"include_usage": False}
    )))
    c.append(Case("chat-top-logprobs-zero", CHAT, chat(logprobs=True, top_logprobs=0,
                                                       max_tokens=3)))
    c.append(Case("chat-n2-logprobs-stream", CHAT, chat(
        n=2, temperature=1.0, seed=4, logprobs=True, top_logprobs=2, max_tokens=3, stream=True
    ), compare="seeded"))
    # vLLM's own extensions.
    c += both(Case("chat-return-token-ids", CHAT, chat(return_token_ids=True, max_tokens=5)))
    c += both(Case("completion-return-token-ids", COMPLETIONS, completion(
        return_token_ids=True, max_tokens=4
    )))
    c.append(Case("chat-keep-special-tokens", CHAT, chat(skip_special_tokens=False)))
    c += both(Case("chat-ignore-eos", CHAT, chat(ignore_eos=True, max_tokens=10)))
    c += both(Case("chat-tokens-as-ids", CHAT, chat(
        logprobs=True, top_logprobs=1, return_tokens_as_token_ids=True, max_tokens=3
    )))
    c.append(Case("completion-stop-token-ids", COMPLETIONS, completion(
        stop_token_ids=[TOKEN_PERIOD]
    )))
    c.append(Case("chat-continue-final-message", CHAT, chat(
        messages=[
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "The capital of France is"},
        ],
        add_generation_prompt=False, continue_final_message=True, max_tokens=4,
    )))
    c += both(Case("chat-grammar", CHAT, chat(
        structured_outputs={"grammar": 'root ::= "Paris" | "Lyon"'}
    )))
    c.append(Case("chat-response-format-text", CHAT, chat(response_format={"type": "text"})))
    refused = "Refused with a 400 naming it, which the issue allows for a field not honoured."
    c.append(Case("chat-prompt-logprobs", CHAT, chat(prompt_logprobs=1), compare="ours_refuses",
                  field="prompt_logprobs", note=refused))
    c.append(Case("chat-beam-search", CHAT, chat(use_beam_search=True), compare="ours_refuses",
                  field="use_beam_search", note=refused))
    # Models and tokenizer.
    c.append(Case("models", "/v1/models", method="GET"))
    c.append(Case("tokenize-prompt", "/tokenize", {"model": MODEL, "prompt": "Hello world"}))
    c.append(Case("tokenize-strs", "/tokenize", {
        "model": MODEL, "prompt": "Hello world", "return_token_strs": True,
        "add_special_tokens": False,
    }))
    c.append(Case("tokenize-messages", "/tokenize", {
        "model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
    }))
    c.append(Case("tokenize-messages-tools", "/tokenize", {
        "model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "tools": tools,
        "add_generation_prompt": False,
    }))
    c.append(Case("detokenize", "/detokenize", {"model": MODEL, "tokens": TOKENS_HELLO_WORLD}))
    c += _bad_inputs()
    return c


def _bad_inputs() -> list[Case]:
    msgs = [{"role": "user", "content": QUESTION}]
    bad: list[tuple[str, str, str, dict[str, Any]]] = [
        ("bad-temperature-type", "temperature", CHAT, chat(temperature="hot")),
        ("bad-temperature-negative", "temperature", CHAT, chat(temperature=-1)),
        ("bad-max-tokens-type", "max_tokens", CHAT, chat(max_tokens="ten")),
        ("bad-max-tokens-zero", "max_tokens", CHAT, chat(max_tokens=0)),
        ("bad-messages-type", "messages", CHAT, chat(messages="hello")),
        ("bad-messages-empty", "messages", CHAT, chat(messages=[])),
        ("bad-messages-missing", "messages", CHAT, {"model": MODEL, "max_tokens": 4}),
        ("bad-stop-type", "stop", CHAT, chat(stop=5)),
        ("bad-n-zero", "n", CHAT, chat(n=0)),
        ("bad-n-too-large", "n", CHAT, chat(n=1000)),
        ("bad-top-logprobs-too-large", "top_logprobs", CHAT, chat(logprobs=True, top_logprobs=50)),
        ("bad-top-logprobs-without-logprobs", "top_logprobs", CHAT, chat(top_logprobs=3)),
        ("bad-completion-logprobs-too-large", "logprobs", COMPLETIONS, completion(logprobs=50)),
        ("bad-logit-bias-token", "logit_bias", CHAT, chat(logit_bias={str(TOKEN_OUT_OF_VOCAB): 5})),
        ("bad-logit-bias-key", "logit_bias", CHAT, chat(logit_bias={"hello": 5})),
        ("bad-json-schema", "response_format", CHAT, chat(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}},
        })),
        ("bad-response-format-type", "response_format", CHAT,
         chat(response_format={"type": "yaml"})),
        ("bad-regex", "regex", CHAT, chat(structured_outputs={"regex": "(["})),
        ("bad-two-structured", "structured_outputs", CHAT,
         chat(structured_outputs={"regex": "a+", "choice": ["a"]})),
        ("bad-unknown-model", "model", CHAT, chat(model="no-such-model")),
        ("bad-unknown-model-completion", "model", COMPLETIONS, completion(model="no-such-model")),
        ("bad-max-tokens-over-context", "max_tokens", CHAT, chat(max_tokens=5000)),
        ("bad-completion-over-context", "max_tokens", COMPLETIONS, completion(max_tokens=4096)),
        ("bad-tool-choice-without-tools", "tool_choice", CHAT, chat(
            tool_choice={"type": "function", "function": {"name": "get_weather"}}
        )),
        ("bad-tool-choice-unknown-function", "tool_choice", CHAT, chat(
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )),
        ("bad-tool-choice-value", "tool_choice", CHAT,
         chat(tools=[WEATHER_TOOL], tool_choice="sometimes")),
        ("bad-stream-options-without-stream", "stream_options", CHAT,
         chat(stream_options={"include_usage": True})),
        ("bad-completion-prompt-missing", "prompt", COMPLETIONS, {"model": MODEL, "max_tokens": 4}),
        ("bad-completion-prompt-type", "prompt", COMPLETIONS, completion(prompt=5)),
        ("bad-min-tokens-above-max", "min_tokens", CHAT, chat(min_tokens=20, max_tokens=4)),
        ("bad-tokenize-missing", "prompt", "/tokenize", {"model": MODEL}),
        ("bad-tokenize-unknown-model", "model", "/tokenize",
         {"model": "no-such-model", "prompt": "x"}),
    ]
    bad += [
        ("bad-image-part", "messages", CHAT, chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}
        ]}])),
        ("bad-temperature-too-high", "temperature", CHAT, chat(temperature=5)),
        ("bad-top-p-zero", "top_p", CHAT, chat(top_p=0)),
        ("bad-seed-type", "seed", CHAT, chat(seed=1.5)),
    ]
    cases = [Case(name, path, body, field=name_) for name, name_, path, body in bad]
    cases.append(Case(
        "bad-logit-bias-value", CHAT, chat(logit_bias={str(TOKEN_HELLO): 500}),
        compare="ours_refuses", field="logit_bias",
        note="OpenAI's API takes biases from -100 to 100 and refuses others; vLLM applies any "
        "value (200). Ours keeps OpenAI's documented range.",
    ))
    outside_api = (
        "Outside the API vLLM answers FastAPI's default {\"detail\": ...}; ours answers the "
        "OpenAI error object every other error has, so clients parse one shape."
    )
    cases.append(Case("bad-unknown-route", "/v1/nothing-here", {"model": MODEL},
                      compare="status", note=outside_api))
    cases.append(Case("bad-method", CHAT, method="GET", compare="status", note=outside_api))
    cases.append(Case("bad-stream-n-too-large", CHAT, chat(n=1000, stream=True), field="n"))
    cases.append(Case("bad-malformed-json", CHAT, raw=b'{"model": "smollm2", "messages": ['))
    cases.append(Case("bad-body-not-object", CHAT, raw=b"[1, 2]"))
    cases.append(Case(
        "unknown-field", CHAT, chat(frobnicate=True), compare="ours_refuses", field="frobnicate",
        note="vLLM logs and ignores unknown fields (200); the issue requires a 400 naming it.",
    ))
    cases.append(Case(
        "unknown-field-completion", COMPLETIONS, completion(best_guess=1),
        compare="ours_refuses", field="best_guess",
        note="vLLM logs and ignores unknown fields (200); the issue requires a 400 naming it.",
    ))
    cases.append(Case(
        "removed-guided-field", CHAT, chat(guided_choice=["a", "b"]),
        compare="ours_refuses", field="guided_choice",
        note="vLLM ignores the removed guided_* fields with a warning, so the output is silently "
        "unconstrained; the issue forbids silently ignoring a field.",
    ))
    cases.append(Case(
        "bad-detokenize-token", "/detokenize", {"model": MODEL, "tokens": [TOKEN_OUT_OF_VOCAB]},
        compare="ours_refuses", field="tokens",
        note="vLLM answers 200 with an empty prompt for an out-of-vocabulary id; bad input "
        "must get a 4xx naming the field (the replica's Detokenize refuses it).",
    ))
    cases.append(Case("custom-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]),
                      note="vLLM renders any role its chat template accepts"))
    cases.append(Case("messages-alone", CHAT, {"model": MODEL, "messages": msgs, "max_tokens": 3,
                                                "temperature": 0}))
    return cases

# fmt: on


CASES: list[Case] = _cases()
NAMES = [case.name for case in CASES]
assert len(set(NAMES)) == len(NAMES), "case names must be unique"

__all__ = ["CASES", "MODEL", "QUESTION", "Case"]
