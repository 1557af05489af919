"""SSE encodings: valid JSON events of each API, escaping, usage and the end markers."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.api_models import GenerationInput
from gateway.sse import DONE, ChatFormat, CompletionFormat, SeedFormat
from protos import replica_pb2


def events(raw: bytes) -> list[dict[str, object]]:
    out = []
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                out.append(orjson.loads(line[6:]))
    return out


def inp(include_usage: bool = True, stop: tuple[str, ...] = ()) -> GenerationInput:
    sampling = replica_pb2.SamplingParams(stop=stop)
    return GenerationInput(prompt="p", sampling=sampling, include_usage=include_usage)


def finish(
    text: str = "", reason: str = "stop", usage: tuple[int, int] = (1, 1), stop: str = ""
) -> replica_pb2.RequestDelta:
    return replica_pb2.RequestDelta(
        text=text,
        finish_reason=reason,
        prompt_tokens=usage[0],
        completion_tokens=usage[1],
        stop_reason=stop,
    )


def test_seed_events() -> None:
    fmt = SeedFormat("rid", "m", inp())
    tricky = 'say "hi"\n\\ é'
    raw = fmt.token(tricky) + fmt.final(finish("!", "length", (3, 2)))
    first, last_token, last = events(raw)
    assert first == {"token": tricky, "finished": False}
    assert last_token == {"token": "!", "finished": False}  # the finishing delta's text
    assert last["finished"] is True and last["finish_reason"] == "length"
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert raw.count(b"\n\n") == 3
    err = fmt.error("boom", 502)
    assert err.startswith(b"event: error\n")
    assert events(err)[0]["error"]["message"] == "boom"  # type: ignore[index]
    fmt.add(replica_pb2.RequestDelta(text="ab"))
    fmt.add(replica_pb2.RequestDelta(text="c", finish_reason="stop"))
    assert fmt.finished == 1
    whole = fmt.body(finish("c"))
    assert whole["text"] == "abc" and whole["finish_reason"] == "stop"


def test_chat_chunks_match_vllm_shapes() -> None:
    fmt = ChatFormat("r1", 'we"ird', inp(stop=("END",)), "fp-1")
    raw = (
        fmt.first()
        + fmt.token("Hel")
        + fmt.token("lo")
        + fmt.final(finish("!", "stop", (4, 3), "END"))
    )
    assert raw.endswith(DONE)
    chunks = events(raw)
    assert all(c["id"] == "chatcmpl-r1" and c["model"] == 'we"ird' for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    first, *tokens, last, usage = chunks
    assert first["choices"] == [  # vLLM's first chunk: the role, and nulls it always writes
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert first["prompt_token_ids"] is None and first["prompt_text"] is None
    assert [t["choices"][0]["token_ids"] for t in tokens] == [None, None]  # type: ignore[index]
    text = "".join(c["choices"][0]["delta"]["content"] for c in [*tokens, last])  # type: ignore[index]
    assert text == "Hello!"
    assert last["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert last["choices"][0]["stop_reason"] == "END"  # type: ignore[index]
    assert "system_fingerprint" not in last  # the usage chunk carries it
    assert usage["choices"] == [] and usage["system_fingerprint"] == "fp-1"
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    no_usage = ChatFormat("r1", "m", inp(include_usage=False), "fp-1")
    (only,) = events(no_usage.final(finish(stop="7")))
    assert only["system_fingerprint"] == "fp-1"
    choice: Any = only["choices"]
    assert choice[0]["stop_reason"] == 7  # a stop token id is a number


def test_completion_chunks() -> None:
    fmt = CompletionFormat("r2", "m", inp(include_usage=False))
    chunks = events(fmt.token("a") + fmt.final(finish("b")))
    assert chunks[0]["choices"][0] == {  # type: ignore[index]
        "index": 0,
        "text": "a",
        "logprobs": None,
        "finish_reason": None,
        "stop_reason": None,
        "prompt_token_ids": None,
        "token_ids": None,
    }
    assert chunks[0]["object"] == "text_completion" and chunks[0]["id"] == "cmpl-r2"
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert chunks[1]["choices"][0]["text"] == "b"  # type: ignore[index]
    error = fmt.error("lost", 503)
    assert error.endswith(DONE)  # vLLM's way: an error object as data, then [DONE]
    assert events(error)[0]["error"] == {  # type: ignore[index]
        "message": "lost",
        "type": "ServiceUnavailableError",
        "param": None,
        "code": 503,
    }


def test_batched_histogram_exports_like_observe() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from gateway.metrics import ITL_BUCKETS, BatchedHistogram

    registry = CollectorRegistry()
    direct = Histogram("direct_seconds", "d", ["m"], buckets=ITL_BUCKETS, registry=registry)
    batched = Histogram("batched_seconds", "b", ["m"], buckets=ITL_BUCKETS, registry=registry)
    local = BatchedHistogram(batched.labels("x"))
    values = [0.0005, 0.001, 0.0011, 0.01, 0.3, 2.5, 7.0, 0.01]
    for v in values:
        direct.labels("x").observe(v)
        local.observe(v)
    before = generate_latest(registry).decode()
    assert 'batched_seconds_count{m="x"} 0.0' in before
    local.flush()
    local.flush()  # nothing new: no change
    text = generate_latest(registry).decode()
    direct_lines = [
        ln.replace("direct", "X") for ln in text.splitlines() if ln.startswith("direct")
    ]
    batched_lines = [
        ln.replace("batched", "X") for ln in text.splitlines() if ln.startswith("batched")
    ]
    strip = [ln for ln in direct_lines if "_created" not in ln]
    assert strip == [ln for ln in batched_lines if "_created" not in ln]
