"""SSE encodings: valid JSON events of each API, escaping, usage and the end markers."""

from __future__ import annotations

import orjson

from gateway.sse import DONE, ChatFormat, CompletionFormat, SeedFormat


def events(raw: bytes) -> list[dict[str, object]]:
    out = []
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                out.append(orjson.loads(line[6:]))
    return out


def test_seed_events() -> None:
    fmt = SeedFormat("rid", "m", True)
    tricky = 'say "hi"\n\\ é'
    raw = fmt.token(tricky) + fmt.final("length", 3, 2)
    first, last = events(raw)
    assert first == {"token": tricky, "finished": False}
    assert last["finished"] is True and last["finish_reason"] == "length"
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert raw.count(b"\n\n") == 2
    err = fmt.error("boom", "upstream_failed")
    assert err.startswith(b"event: error\n")
    assert events(err)[0]["error"]["message"] == "boom"  # type: ignore[index]
    whole = fmt.whole("abc", "stop", 1, 1)
    assert whole["text"] == "abc" and whole["finish_reason"] == "stop"


def test_chat_chunks_match_openai_shapes() -> None:
    fmt = ChatFormat("r1", 'we"ird', include_usage=True)
    raw = fmt.first() + fmt.token("Hel") + fmt.token("lo") + fmt.final("length", 4, 2) + fmt.done
    assert raw.endswith(DONE)
    chunks = events(raw)
    assert all(c["id"] == "chatcmpl-r1" and c["model"] == 'we"ird' for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # type: ignore[index]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])  # type: ignore[index]
    assert text == "Hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6  # type: ignore[index]
    no_usage = ChatFormat("r1", "m", include_usage=False)
    assert len(events(no_usage.final("stop", 1, 1))) == 1
    whole = fmt.whole("Hello", "abort", 1, 2)
    assert whole["choices"][0]["message"]["content"] == "Hello"  # type: ignore[index]
    assert whole["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]


def test_completion_chunks() -> None:
    fmt = CompletionFormat("r2", "m", include_usage=False)
    chunks = events(fmt.token("a") + fmt.final("stop", 1, 1))
    assert chunks[0]["choices"][0]["text"] == "a"  # type: ignore[index]
    assert chunks[0]["object"] == "text_completion" and chunks[0]["id"] == "cmpl-r2"
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]


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
