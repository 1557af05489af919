"""The gateway's HTTP API against real processes: a fake-engine replica and `mss gateway`.

SSE as curl sees it (a plain-text body is the user's message), the official
`openai` package streaming and not, the service routes, the OpenAPI document,
and every bad-input case answered with a precise 4xx JSON error and nothing
else. The OpenAI API's extras (n, logprobs, tools...) are in
test_gateway_openai.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support import (
    FAKE_GATEWAY_CONFIG,
    FAKE_MAX_TOKENS,
    FAKE_MODEL,
    Proc,
    fake_stack,
    free_port,
    sse_events,
    start_gateway,
    start_replica,
)

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


def curl(*args: str) -> str:
    assert shutil.which("curl"), "curl is needed for this test"
    done = subprocess.run(["curl", "-sN", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_sse_as_curl_sees_it(url: str) -> None:
    out = curl(
        "-X",
        "POST",
        f"{url}/v1/chat/{MODEL}",
        "-H",
        "Content-Type: text/plain",
        "-d",
        "What is the capital of France?",
    )
    events = sse_events(out)
    tokens = [d for _, d in events[:-1]]
    assert len(tokens) == MAX_TOKENS  # text/plain takes the model's max_tokens
    assert all(isinstance(d, dict) and d["finished"] is False for d in tokens)
    last = events[-1][1]
    assert isinstance(last, dict) and last["finished"] is True
    assert last["finish_reason"] == "length"
    # The body is the user's message, rendered with the chat template: as many prompt
    # tokens as /tokenize counts for that one message.
    counted = httpx.post(
        f"{url}/tokenize",
        json={"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    ).json()["count"]
    assert counted > 6  # more than the six words sent raw
    assert last["usage"] == {
        "prompt_tokens": counted,
        "completion_tokens": MAX_TOKENS,
        "total_tokens": counted + MAX_TOKENS,
    }
    # JSON body, with curl's default content type (what `curl -d` sends) too.
    for extra in (["-H", "Content-Type: application/json"], []):
        out = curl(
            "-X",
            "POST",
            f"{url}/v1/chat/{MODEL}",
            *extra,
            "-d",
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stop": ["zzz"]}
            ),
        )
        events = sse_events(out)
        assert len(events) == 4
        text = "".join(str(d["token"]) for _, d in events if isinstance(d, dict))
        assert len(text.split()) == 3


def test_seed_route_without_streaming(url: str) -> None:
    r = httpx.post(
        f"{url}/v1/chat/{MODEL}",
        json={"prompt": "one two", "max_tokens": 5, "stream": False},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finished"] is True and body["finish_reason"] == "length"
    assert len(body["text"].split()) == 5 and body["usage"]["completion_tokens"] == 5
    assert body["id"] == r.headers["x-request-id"]


def test_openai_package_streaming_and_not(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert full.object == "chat.completion" and full.model == MODEL
    assert full.choices[0].finish_reason == "length"
    content = full.choices[0].message.content or ""
    assert len(content.split()) == 8
    assert full.usage is not None and full.usage.completion_tokens == 8

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == content  # the fake engine is deterministic for a prompt
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].created > 0

    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert comp.object == "text_completion" and len(comp.choices[0].text.split()) == 4
    pieces = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=4, stream=True
    )
    assert "".join(p.choices[0].text for p in pieces) == comp.choices[0].text

    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=messages)
    assert "nope" in str(err.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10_000)
    assert "max_tokens" in str(bad.value)


def test_health_ready_request_id_metrics(url: str) -> None:
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 200 and ready.json()["ready_replicas"] == {MODEL: 1}
    given = httpx.get(f"{url}/health", headers={"x-request-id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = httpx.get(f"{url}/nowhere")
    assert made.status_code == 404 and len(made.headers["x-request-id"]) >= 16
    sane = httpx.get(f"{url}/health", headers={"x-request-id": "has space"})
    assert sane.headers["x-request-id"] != "has space"
    r = httpx.post(
        f"{url}/v1/chat/{MODEL}",
        json={"prompt": "x", "max_tokens": 2},
        headers={"x-request-id": "trace-me"},
    )
    assert r.headers["x-request-id"] == "trace-me"
    metrics = httpx.get(f"{url}/metrics").text
    for name in (
        "mss_gateway_requests_total",
        "mss_gateway_ttft_seconds_bucket",
        "mss_gateway_itl_seconds_bucket",
        "mss_gateway_in_flight",
        "mss_gateway_routing_decisions_total",
        "mss_gateway_routing_table_version 1.0",
        "mss_gateway_output_tokens_total",
        "mss_gateway_replica_kv_cache_usage",
    ):
        assert name in metrics, name
    assert f'mss_gateway_requests_total{{code="200",model="{MODEL}"' in metrics


def test_openapi_document_matches_routes(url: str) -> None:
    doc = httpx.get(f"{url}/openapi.json").json()
    paths = doc["paths"]
    for path in ("/v1/chat/{model}", "/v1/chat/completions", "/v1/completions", "/detokenize"):
        body = paths[path]["post"]["requestBody"]["content"]
        ref = body["application/json"]["schema"]["$ref"]
        assert ref.split("/")[-1] in doc["components"]["schemas"]
    variants = paths["/tokenize"]["post"]["requestBody"]["content"]["application/json"]
    for variant in variants["schema"]["oneOf"]:
        assert variant["$ref"].split("/")[-1] in doc["components"]["schemas"]
    assert "text/plain" in paths["/v1/chat/{model}"]["post"]["requestBody"]["content"]
    assert "get" in paths["/v1/models"] and "get" in paths["/ready"]
    schemas = doc["components"]["schemas"]
    assert "max_tokens" in schemas["SeedChatRequest"]["properties"]
    assert "ChatMessage" in schemas


BAD_INPUTS: list[tuple[str, str, str, dict[str, str], bytes, int, str]] = [
    # (case, method, path, headers, body, status, text in message)
    (
        "malformed json",
        "POST",
        f"/v1/chat/{MODEL}",
        {"content-type": "application/json"},
        b'{"prompt": ',
        400,
        "malformed JSON",
    ),
    (
        "json not object",
        "POST",
        "/v1/chat/completions",
        {"content-type": "application/json"},
        b"[1]",
        400,
        "expected a JSON object",
    ),
    (
        "wrong type",
        "POST",
        f"/v1/chat/{MODEL}",
        {"content-type": "application/json"},
        b'{"prompt": "x", "max_tokens": "5"}',
        400,
        "max_tokens",
    ),
    (
        "bool as number",
        "POST",
        "/v1/completions",
        {"content-type": "application/json"},
        b'{"model": "smollm2", "prompt": "x", "temperature": true}',
        400,
        "temperature",
    ),
    (
        "missing prompt",
        "POST",
        f"/v1/chat/{MODEL}",
        {"content-type": "application/json"},
        b'{"max_tokens": 3}',
        400,
        "exactly one of",
    ),
    (
        "missing messages",
        "POST",
        "/v1/chat/completions",
        {"content-type": "application/json"},
        b'{"model": "smollm2"}',
        400,
        "messages",
    ),
    (
        "empty text prompt",
        "POST",
        f"/v1/chat/{MODEL}",
        {"content-type": "text/plain"},
        b"  ",
        400,
        "empty",
    ),
    (
        "bad utf-8",
        "POST",
        f"/v1/chat/{MODEL}",
        {"content-type": "text/plain"},
        b"\xff\xfe",
        400,
        "UTF-8",
    ),
    (
        "max_tokens zero",
        "POST",
        f"/v1/chat/{MODEL}",
        {"content-type": "application/json"},
        b'{"prompt": "x", "max_tokens": 0}',
        400,
        "max_tokens",
    ),
    (
        "max_tokens over limit",
        "POST",
        f"/v1/chat/{MODEL}",
        {"content-type": "application/json"},
        b'{"prompt": "x", "max_tokens": 25}',
        400,
        "limit of 24",
    ),
    (
        "max_tokens huge",
        "POST",
        "/v1/completions",
        {"content-type": "application/json"},
        b'{"model": "smollm2", "prompt": "x", "max_tokens": 99999999999}',
        400,
        "max_tokens",
    ),
    (
        "n too large",
        "POST",
        "/v1/chat/completions",
        {"content-type": "application/json"},
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "n": 1000}',
        400,
        "n:",
    ),
    (
        "unknown openai field",
        "POST",
        "/v1/chat/completions",
        {"content-type": "application/json"},
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "temprature": 0}',
        400,
        "temprature: unknown field",
    ),
    (
        "refused field",
        "POST",
        "/v1/completions",
        {"content-type": "application/json"},
        b'{"model": "smollm2", "prompt": "x", "use_beam_search": true}',
        400,
        "use_beam_search:",
    ),
    (
        "auto tool choice",
        "POST",
        "/v1/chat/completions",
        {"content-type": "application/json"},
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "tools": '
        b'[{"type": "function", "function": {"name": "f"}}]}',
        400,
        "tool_choice:",
    ),
    (
        "detokenize bad id",
        "POST",
        "/detokenize",
        {"content-type": "application/json"},
        b'{"model": "smollm2", "tokens": [-1]}',
        400,
        "tokens",
    ),
    (
        "tokenize unknown model",
        "POST",
        "/tokenize",
        {"content-type": "application/json"},
        b'{"model": "nomodel", "prompt": "x"}',
        404,
        "nomodel",
    ),
    (
        "bad role",
        "POST",
        "/v1/chat/completions",
        {"content-type": "application/json"},
        b'{"model": "smollm2", "messages": [{"role": "", "content": "x"}]}',
        400,
        "role",
    ),
    (
        "unknown field",
        "POST",
        f"/v1/chat/{MODEL}",
        {"content-type": "application/json"},
        b'{"prompt": "x", "colour": "red"}',
        400,
        "colour: unknown field",
    ),
    (
        "unknown model seed",
        "POST",
        "/v1/chat/nomodel",
        {"content-type": "text/plain"},
        b"hi",
        404,
        "nomodel",
    ),
    (
        "unknown model openai",
        "POST",
        "/v1/completions",
        {"content-type": "application/json"},
        b'{"model": "nomodel", "prompt": "x"}',
        404,
        "nomodel",
    ),
    (
        "body too large",
        "POST",
        f"/v1/chat/{MODEL}",
        {"content-type": "text/plain"},
        b"x" * 5000,
        413,
        "over the limit of 4096",
    ),
    (
        "unsupported type",
        "POST",
        "/v1/chat/completions",
        {"content-type": "application/xml"},
        b"<a/>",
        415,
        "application/xml",
    ),
    (
        "text to openai",
        "POST",
        "/v1/completions",
        {"content-type": "text/plain"},
        b"hi",
        415,
        "text/plain",
    ),
    ("wrong method", "GET", "/v1/chat/completions", {}, b"", 405, "GET"),
    ("wrong method seed", "DELETE", f"/v1/chat/{MODEL}", {}, b"", 405, "DELETE"),
    ("unknown route", "POST", "/v2/anything", {}, b"{}", 404, "/v2/anything"),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "text"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_gets_a_precise_4xx(
    url: str, method: str, path: str, headers: dict[str, str], body: bytes, status: int, text: str
) -> None:
    r = httpx.request(method, url + path, headers=headers, content=body, timeout=10)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert text in err["message"], err
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    if status == 405:
        assert "POST" in r.headers["allow"]


def test_chunked_body_over_the_limit_is_413(url: str) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"y" * 1000

    r = httpx.post(
        f"{url}/v1/chat/{MODEL}", content=chunks(), headers={"content-type": "text/plain"}
    )
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]


def test_replica_refusal_before_output_is_a_4xx(url: str) -> None:
    # The fake replica's context is 2048 tokens: 2047 prompt words plus 24 tokens do not fit,
    # which only the replica knows: INVALID_ARGUMENT there, 400 here.
    r = httpx.post(
        f"{url}/v1/chat/{MODEL}",
        content=("a " * 2047).encode(),
        headers={"content-type": "text/plain"},
        timeout=10,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "the context of 2048 tokens" in error["message"]
    assert error["param"] in ("prompt", "max_tokens")  # the replica's refusal names its field


def test_not_ready_without_a_replica() -> None:
    dead = f"127.0.0.1:{free_port()}"
    gateway = start_gateway([(MODEL, dead)], ready=False)
    try:
        ready = httpx.get(f"{gateway.address}/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        r = httpx.post(
            f"{gateway.address}/v1/chat/{MODEL}",
            content=b"hi",
            headers={"content-type": "text/plain"},
            timeout=10,
        )
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "no ready replica" in r.json()["error"]["message"]
    finally:
        gateway.stop()


def test_several_workers_share_one_port_and_metrics() -> None:
    replica = start_replica(token_interval_ms=1)
    gateway = None
    try:
        gateway = start_gateway([(MODEL, replica.address)], config=CONFIG, extra=["--workers", "2"])
        # /ready answered by one worker; each probes the replica on its own, so wait until
        # ten answers in a row (spread over both by the kernel) say ready.
        deadline, in_a_row = time.monotonic() + 20, 0
        while in_a_row < 10 and time.monotonic() < deadline:
            ready = httpx.get(f"{gateway.address}/ready", timeout=5).status_code == 200
            in_a_row = in_a_row + 1 if ready else 0
            time.sleep(0.05)
        for _ in range(6):
            r = httpx.post(
                f"{gateway.address}/v1/chat/{MODEL}",
                json={"prompt": "x", "max_tokens": 2, "stream": False},
                timeout=10,
            )
            assert r.status_code == 200
        text = httpx.get(f"{gateway.address}/metrics").text
        line = next(
            ln
            for ln in text.splitlines()
            if ln.startswith("mss_gateway_requests_total") and 'code="200"' in ln
        )
        assert float(line.split()[-1]) == 6.0  # counted across both workers
    finally:
        if gateway is not None:
            gateway.stop()
        replica.stop()
