"""The OpenAI API's extras through real processes: a fake-engine replica and `mss gateway`.

n choices, logprobs, forced tool calls and the `openai` package's `parse`
helper, /tokenize, /detokenize, /v1/models, and the seed route's sampling
fields. The fake engine's deterministic answers for these are described in
replica/fake_engine.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam
from pydantic import BaseModel

from tests.support import FAKE_GATEWAY_CONFIG, FAKE_MAX_TOKENS, FAKE_MODEL, Proc, fake_stack

MODEL = FAKE_MODEL
MAX_TOKENS = FAKE_MAX_TOKENS
CONFIG = FAKE_GATEWAY_CONFIG


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Proc, Proc]]:
    with fake_stack(MODEL, CONFIG) as procs:
        yield procs


@pytest.fixture(scope="module")
def url(stack: tuple[Proc, Proc]) -> str:
    return stack[1].address


def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]
WEATHER: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}


def test_n_choices_streaming_and_not(url: str) -> None:
    client = oai(url)
    full = client.chat.completions.create(model=MODEL, messages=HELLO, n=2, max_tokens=5)
    assert [c.index for c in full.choices] == [0, 1]
    texts = [c.message.content or "" for c in full.choices]
    assert all(len(t.split()) == 5 for t in texts) and texts[0] != texts[1]
    assert full.usage is not None and full.usage.completion_tokens == 10
    assert full.system_fingerprint and full.id.startswith("chatcmpl-")

    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        n=2,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = {0: "", 1: ""}
    finishes: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [streamed[0], streamed[1]] == texts  # deterministic for a prompt
    assert finishes == {0: "length", 1: "length"}
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant", "assistant"]  # a role chunk per choice
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10

    comp = client.completions.create(model=MODEL, prompt="Once upon", n=3, max_tokens=2)
    assert sorted(c.index for c in comp.choices) == [0, 1, 2]


def test_logprobs_chat_and_completions(url: str) -> None:
    client = oai(url)
    full = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, logprobs=True, top_logprobs=2
    )
    logprobs = full.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == 3
    text = "".join(item.token for item in logprobs.content)
    assert text == full.choices[0].message.content
    for item in logprobs.content:
        assert item.logprob <= 0 and item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].token == item.token

    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, logprobs=True, stream=True
    )
    items = [
        item
        for chunk in stream
        for choice in chunk.choices
        if choice.logprobs and choice.logprobs.content
        for item in choice.logprobs.content
    ]
    assert [i.token for i in items] == [i.token for i in logprobs.content]
    assert all(i.top_logprobs == [] for i in items)  # top_logprobs 0: the chosen token only

    comp = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, logprobs=1)
    lp = comp.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    assert "".join(lp.tokens) == comp.choices[0].text and lp.text_offset[0] == 0
    assert lp.top_logprobs is not None and all(len(t) <= 2 for t in lp.top_logprobs)
    echo = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=2, echo=True, logprobs=0
    )
    assert echo.choices[0].text.startswith("Once upon")
    elp = echo.choices[0].logprobs
    assert elp is not None and elp.token_logprobs is not None and elp.token_logprobs[0] is None


def test_echo_of_a_prompt_given_as_token_ids(url: str) -> None:
    """The prompt's ids come back as their text, decoded as /detokenize decodes them."""
    ids = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "Once upon a"}).json()
    text = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": ids["tokens"]})
    prompt = text.json()["prompt"]
    client = oai(url)
    echo = client.completions.create(model=MODEL, prompt=ids["tokens"], max_tokens=2, echo=True)
    plain = client.completions.create(model=MODEL, prompt=ids["tokens"], max_tokens=2)
    assert echo.choices[0].text == prompt + plain.choices[0].text
    streamed = client.completions.create(
        model=MODEL, prompt=[ids["tokens"]], max_tokens=2, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echo.choices[0].text
    # With the ids asked back, the prompt comes back as ids, not as text (vLLM's way).
    body = {"model": MODEL, "prompt": "Once upon a", "max_tokens": 2, "echo": True}
    reply = httpx.post(f"{url}/v1/completions", json={**body, "return_token_ids": True})
    choice = reply.json()["choices"][0]
    without = httpx.post(f"{url}/v1/completions", json={**body, "echo": False}).json()
    assert choice["text"] == without["choices"][0]["text"]
    assert choice["prompt_token_ids"] == ids["tokens"]
    # An id outside the vocabulary is refused naming the prompt, as without echo.
    bad = {**body, "prompt": [ids["tokens"][0], 2**30]}
    for echoed in (True, False):
        reply = httpx.post(f"{url}/v1/completions", json={**bad, "echo": echoed})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == "prompt" and "vocabulary" in error["message"], error


def test_forced_tool_calls_through_the_openai_client(url: str) -> None:
    client = oai(url)
    named = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=MAX_TOKENS,
    )
    message = named.choices[0].message
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert set(json.loads(call.function.arguments)) >= {"city"}  # type: ignore[union-attr]
    assert named.choices[0].finish_reason == "stop"

    required = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Time in Paris?"}],
        tools=[CLOCK, WEATHER],
        tool_choice="required",
        max_tokens=MAX_TOKENS,
    )
    calls = required.choices[0].message.tool_calls
    assert calls and required.choices[0].finish_reason == "tool_calls"
    assert all(c.function.name in ("get_weather", "get_time") for c in calls)  # type: ignore[union-attr]

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    arguments, names = "", []
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.function and delta.function.name:
                    names.append(delta.function.name)
                arguments += (delta.function.arguments or "") if delta.function else ""
    assert names == ["get_weather"] and "city" in json.loads(arguments)


class City(BaseModel):
    city: str
    population: int


def test_parse_helper_with_a_pydantic_response_format(url: str) -> None:
    client = oai(url)
    parsed = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "The capital of France, as JSON."}],
        response_format=City,
        max_tokens=MAX_TOKENS,
    )
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City)

    tool = openai.pydantic_function_tool(City, name="record_city")
    forced = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Record Paris."}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "record_city"}},
        max_tokens=MAX_TOKENS,
    )
    (call,) = forced.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, City)


def test_tokenize_detokenize_and_models(url: str) -> None:
    tokens = httpx.post(
        f"{url}/tokenize",
        json={"model": MODEL, "prompt": "the quick fox", "return_token_strs": True},
    ).json()
    assert tokens["count"] == len(tokens["tokens"]) == 3
    assert tokens["token_strs"] == ["the", "quick", "fox"] and tokens["max_model_len"] == 2048
    plain = httpx.post(f"{url}/tokenize", json={"prompt": "the quick fox"}).json()
    assert plain["tokens"] == tokens["tokens"] and plain["token_strs"] is None  # model optional
    back = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "the quick fox"}
    chat = httpx.post(
        f"{url}/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    ).json()
    assert chat["count"] >= 1
    both = httpx.post(
        f"{url}/tokenize",
        json={"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True},
    )
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"

    (card,) = httpx.get(f"{url}/v1/models").json()["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["root"] == MODEL
    assert card["parent"] is None and card["max_model_len"] == 2048
    (permission,) = card["permission"]
    assert permission["object"] == "model_permission" and permission["allow_sampling"] is True
    assert card["ready_replicas"] == 1 and card["max_tokens"] == MAX_TOKENS  # our own fields


def test_seed_json_gains_the_sampling_fields(url: str) -> None:
    r = httpx.post(
        f"{url}/v1/chat/{MODEL}",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
            "max_tokens": 6,
            "stop_token_ids": [0],  # "the" in the fake vocabulary
            "presence_penalty": 0.5,
            "seed": 3,
        },
        timeout=10,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finished"] is True and body["finish_reason"] in ("stop", "length")
    bad = httpx.post(f"{url}/v1/chat/{MODEL}", json={"prompt": "x", "presence_penalty": 9})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "presence_penalty"
