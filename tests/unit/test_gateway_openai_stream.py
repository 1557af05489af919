"""OpenAI responses with extras: n choices interleaved, logprob objects, tool-call deltas,
continuous usage, echo, token ids; and whole bodies with vLLM's fields."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.api_models import GenerationInput, OutputOptions
from gateway.openai_stream import (
    RichChatFormat,
    RichCompletionFormat,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs,
)
from protos import replica_pb2

TL = replica_pb2.TokenLogprob
TOP = replica_pb2.TopLogprob


def chunks(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: ") and block != b"data: [DONE]":
            out.append(orjson.loads(block[6:]))
    return out


def entry(token_id: int, token: str, logprob: float, *top: tuple[int, str, float]) -> Any:
    return TL(
        token_id=token_id,
        token=token,
        logprob=logprob,
        has_logprob=True,
        top=[TOP(token_id=i, token=t, logprob=lp) for i, t, lp in top],
    )


def delta(index: int, text: str, ids: list[int], **kw: Any) -> replica_pb2.RequestDelta:
    return replica_pb2.RequestDelta(
        index=index, text=text, token_ids=ids, num_tokens=len(ids), **kw
    )


def inp(**output: Any) -> GenerationInput:
    include_usage = output.pop("include_usage", False)
    return GenerationInput(
        messages=[replica_pb2.ChatMessage(role="user", content="hi")],
        include_usage=include_usage,
        output=OutputOptions(**output),
    )


def test_chat_logprobs_list_the_chosen_token_then_the_alternatives() -> None:
    sampled = entry(5, "Hi", -0.5, (9, "Hello", -0.25), (5, "Hi", -0.5), (7, "Hey", -3.0))
    (item,) = chat_logprobs([sampled], top=2, as_ids=False)["content"]
    assert item["token"] == "Hi" and item["logprob"] == -0.5 and item["bytes"] == [72, 105]
    assert [t["token"] for t in item["top_logprobs"]] == ["Hi", "Hello"]
    assert item["top_logprobs"][1] == {"token": "Hello", "logprob": -0.25, "bytes": list(b"Hello")}
    (none,) = chat_logprobs([sampled], top=0, as_ids=False)["content"]
    assert none["top_logprobs"] == []
    (ids,) = chat_logprobs([entry(5, "Hi", float("-inf"))], top=0, as_ids=True)["content"]
    assert ids["token"] == "token_id:5" and ids["logprob"] == -9999.0


def test_completion_logprobs_map_tokens_and_offsets() -> None:
    entries = [
        TL(token_id=1, token="Once", has_logprob=False),  # a prompt's first token has none
        entry(2, " upon", -1.0, (2, " upon", -1.0), (3, " a", -2.0)),
    ]
    lp = completion_logprobs(entries, top=1, as_ids=False, offset=10)
    assert lp == {
        "text_offset": [10, 14],
        "token_logprobs": [None, -1.0],
        "tokens": ["Once", " upon"],
        "top_logprobs": [None, {" upon": -1.0, " a": -2.0}],
    }


def test_n_choices_stream_interleaved_by_index_and_end_when_all_finish() -> None:
    fmt = RichChatFormat("r", "m", inp(n=2, include_usage=True, continuous_usage=True), "fp")
    raw = fmt.feed(delta(0, "A", [1], prompt_token_ids=[7, 8, 9]))
    raw += fmt.feed(delta(1, "B", [2]))
    raw += fmt.feed(delta(1, "b", [3], finish_reason="length"))
    assert fmt.finished == 1
    raw += fmt.feed(delta(0, "a", [4], finish_reason="stop", prompt_tokens=3, completion_tokens=4))
    assert fmt.finished == 2
    final = replica_pb2.RequestDelta(finish_reason="stop", prompt_tokens=3, completion_tokens=4)
    raw += fmt.end(final)
    role0, role1, a, b, b_end, a_end, usage = chunks(raw)
    assert [c["choices"][0]["index"] for c in (role0, role1, a, b, b_end, a_end)] == [
        0,
        1,
        0,
        1,
        1,
        0,
    ]
    assert role0["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role0["usage"] == {
        "prompt_tokens": 3,
        "total_tokens": 3,
        "completion_tokens": 0,
        "completion_tokens_details": None,
    }
    assert b_end["choices"][0]["finish_reason"] == "length"
    assert b_end["choices"][0]["delta"] == {"content": "b"}
    assert b_end["usage"]["completion_tokens"] == 2  # that choice's tokens so far
    assert a_end["choices"][0]["finish_reason"] == "stop"
    assert "stop_reason" in a_end["choices"][0] and "stop_reason" not in a["choices"][0]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert usage["system_fingerprint"] == "fp"
    assert raw.endswith(b"data: [DONE]\n\n")


def test_a_whole_chat_body_has_vllms_fields() -> None:
    fmt = RichChatFormat("r", "m", inp(n=2, logprobs=1, return_token_ids=True), "fp")
    fmt.add(
        delta(
            0, "Hi", [5], logprobs=[entry(5, "Hi", -0.5, (5, "Hi", -0.5))], prompt_token_ids=[1, 2]
        )
    )
    fmt.add(
        delta(
            1, "Yo", [6], finish_reason="stop", stop_reason="END", logprobs=[entry(6, "Yo", -1.0)]
        )
    )
    fmt.add(delta(0, "", [0], finish_reason="stop"))
    body = fmt.body(replica_pb2.RequestDelta(prompt_tokens=2, completion_tokens=3))
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-r"
    assert body["system_fingerprint"] == "fp" and body["service_tier"] is None
    assert body["usage"] == {
        "prompt_tokens": 2,
        "total_tokens": 5,
        "completion_tokens": 3,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    assert body["prompt_token_ids"] == [1, 2]
    first, second = body["choices"]
    assert first["message"] == {
        "role": "assistant",
        "content": "Hi",
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "reasoning": None,
    }
    assert first["token_ids"] == [5, 0] and first["logprobs"]["content"][0]["token"] == "Hi"
    assert second["stop_reason"] == "END" and second["message"]["content"] == "Yo"


def test_forced_tool_calls_in_streams_and_bodies() -> None:
    named = RichChatFormat("r", "m", inp(tool_choice="named", tool_name="weather"))
    raw = named.feed(delta(0, '{"city":', [1]))
    raw += named.feed(delta(0, ' "Paris"}', [2], finish_reason="stop"))
    _, first, last = chunks(raw)
    call = first["choices"][0]["delta"]["tool_calls"][0]
    assert call["function"] == {"name": "weather", "arguments": '{"city":'} and call["index"] == 0
    assert last["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "function": {"arguments": ' "Paris"}'}}
    ]
    assert last["choices"][0]["finish_reason"] == "stop"  # named: "stop", as OpenAI and vLLM

    required = RichChatFormat("r", "m", inp(tool_choice="required"))
    text = '[{"name": "weather", "parameters": {"city": "Paris"}}]'
    raw = required.feed(delta(0, text[:30], [1]))
    raw += required.feed(delta(0, text[30:], [2], finish_reason="stop"))
    assert chunks(raw)[-1]["choices"][0]["finish_reason"] == "tool_calls"

    whole = RichChatFormat("r", "m", inp(tool_choice="required"))
    whole.add(delta(0, text, [1, 2], finish_reason="stop"))
    (choice,) = whole.body(replica_pb2.RequestDelta())["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == ""
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}


def test_completion_echo_with_logprobs_streams_the_prompt_first() -> None:
    fmt = RichCompletionFormat("r", "m", inp(echo=True, echo_text="Once", logprobs=0), "fp")
    prompt_lp = [TL(token_id=1, token="Once", has_logprob=False)]
    raw = fmt.feed(
        delta(
            0,
            " upon",
            [2],
            prompt_token_ids=[1],
            prompt_logprobs=prompt_lp,
            logprobs=[entry(2, " upon", -1.0)],
        )
    )
    raw += fmt.feed(delta(0, " a", [3], finish_reason="length", logprobs=[entry(3, " a", -2.0)]))
    first, last = chunks(raw)
    choice = first["choices"][0]
    assert choice["text"] == "Once upon" and choice["prompt_token_ids"] == [1]
    assert choice["logprobs"]["tokens"] == ["Once", " upon"]
    assert choice["logprobs"]["token_logprobs"] == [None, -1.0]
    assert last["choices"][0]["logprobs"]["text_offset"] == [9]  # continues after " upon"
    assert last["choices"][0]["finish_reason"] == "length"
    assert "system_fingerprint" not in first and last["system_fingerprint"] == "fp"


def test_prompt_logprobs_are_written_as_vllm_does() -> None:
    first = replica_pb2.TokenLogprob(token_id=5, token="The")
    second = replica_pb2.TokenLogprob(
        token_id=7, token=" cat", logprob=-2.5, rank=3, has_logprob=True
    )
    second.top.add(token_id=7, token=" cat", logprob=-2.5, rank=3)
    second.top.add(token_id=9, token=" dog", logprob=float("-inf"), rank=1)
    assert prompt_logprobs([first, second]) == [
        None,
        {
            "7": {"logprob": -2.5, "rank": 3, "decoded_token": " cat"},
            "9": {"logprob": -9999.0, "rank": 1, "decoded_token": " dog"},
        },
    ]
