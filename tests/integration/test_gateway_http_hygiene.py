"""What the gateway does with clients that misbehave at the HTTP layer, on real sockets.

One fake-engine replica (slow tokens, so a stream outlives every timeout) behind
one `mss gateway` with short limits: connections that never finish their head
or body are closed, a slowloris client is cut, connections past the limit get a
503, a trailing slash is a 404 (no redirect built from Host), long input is not
echoed in full, HTTP/1.0 gets no chunked encoding, and a client leaving
mid-body leaves no traceback in the log. A stream longer than all the timeouts
is not cut. Time to first token counts from a request's first bytes.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import FAKE_MODEL, Proc, sse_events, start_gateway, start_replica

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 16
TOKEN_INTERVAL_MS = 150
CONFIG = f"""
gateway:
  header_timeout_s: {HEADER_TIMEOUT_S}
  body_timeout_s: {BODY_TIMEOUT_S}
  idle_timeout_s: {IDLE_TIMEOUT_S}
  max_connections: {MAX_CONNECTIONS}
deployments:
  - name: {FAKE_MODEL}
    engine: fake
    model: fake
    limits: {{max_tokens: 24}}
"""
CLOSED_WITHIN_S = 5.0
"""A deadline's slack on a loaded CI machine."""


@pytest.fixture(scope="module")
def gateway() -> Iterator[Proc]:
    replica = start_replica(token_interval_ms=TOKEN_INTERVAL_MS)
    try:
        gateway = start_gateway([(FAKE_MODEL, replica.address)], config=CONFIG)
        yield gateway
        gateway.stop()
    finally:
        replica.stop()


def connect(gateway: Proc) -> socket.socket:
    host, port = gateway.address.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=CLOSED_WITHIN_S + 5)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (the socket's timeout
    fails the test if it does not)."""
    out = b""
    with sock:
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return out
            if not data:
                return out
            out += data


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def closed_count(gateway: Proc, reason: str) -> float:
    text = httpx.get(f"{gateway.address}/metrics").text
    prefix = f'mss_gateway_connections_closed_total{{reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def test_connections_that_never_finish_their_head_are_closed(gateway: Proc) -> None:
    before = closed_count(gateway, "header_timeout")
    silent = [connect(gateway) for _ in range(4)]
    partial = [connect(gateway) for _ in range(4)]
    for sock in partial:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    assert all(read_until_closed(sock) == b"" for sock in silent)
    for sock in partial:
        status, headers, body = parse(read_until_closed(sock))
        assert status == 408 and headers["connection"] == "close"
        assert "request head not complete" in json.loads(body)["error"]["message"]
    assert time.monotonic() - started < CLOSED_WITHIN_S
    assert closed_count(gateway, "header_timeout") >= before + 8


def test_a_slowloris_client_is_cut_off_though_it_keeps_sending(gateway: Proc) -> None:
    sock = connect(gateway)
    started = time.monotonic()
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    with pytest.raises(OSError):  # the gateway closes; a later send fails
        for byte in head:
            sock.send(bytes([byte]))
            time.sleep(0.05)
    assert time.monotonic() - started < CLOSED_WITHIN_S
    sock.close()


def test_a_body_that_trickles_in_is_answered_408(gateway: Proc) -> None:
    sock = connect(gateway)
    sock.sendall(
        f"POST /v1/chat/{FAKE_MODEL} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        "Content-Length: 100\r\n\r\nab".encode()
    )
    status, _, body = parse(read_until_closed(sock))
    assert status == 408 and "request body not complete" in body.decode()
    assert "Traceback" not in gateway.log()


def latency_sums(gateway: Proc) -> dict[str, float]:
    """The gateway's latency histograms for the model: each one's sum and count."""
    text = httpx.get(f"{gateway.address}/metrics", timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.endswith(("_sum", "_count"))
        and sample.labels.get("model") == FAKE_MODEL
        and family.name in ("mss_gateway_ttft_seconds", "mss_gateway_queue_seconds")
    }


def test_latencies_count_from_the_request_s_first_bytes(gateway: Proc) -> None:
    """Time to first token includes the time the request took to arrive and be parsed;
    the admission queue's time does not."""
    before = latency_sums(gateway)
    body = json.dumps({"model": FAKE_MODEL, "prompt": "slow body", "max_tokens": 1}).encode()
    sock = connect(gateway)
    with sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:10])
        )
        time.sleep(BODY_TIMEOUT_S / 2)
        sock.sendall(body[10:])
        status, _, answer = parse(sock.recv(65536))
    assert status == 200, answer
    after = latency_sums(gateway)

    def added(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert added("mss_gateway_ttft_seconds_count") == 1
    assert added("mss_gateway_ttft_seconds_sum") >= BODY_TIMEOUT_S / 2
    assert added("mss_gateway_queue_seconds_sum") < BODY_TIMEOUT_S / 4


def test_a_head_over_the_limit_is_431(gateway: Proc) -> None:
    sock = connect(gateway)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    status, _, _ = parse(read_until_closed(sock))
    assert status == 431


def test_an_idle_kept_alive_connection_is_closed(gateway: Proc) -> None:
    sock = connect(gateway)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        first += sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert read_until_closed(sock) == b""
    assert IDLE_TIMEOUT_S * 0.5 < time.monotonic() - started < CLOSED_WITHIN_S


def test_connections_past_the_limit_get_503_then_the_gateway_serves_again(gateway: Proc) -> None:
    held = [connect(gateway) for _ in range(MAX_CONNECTIONS)]
    extra = connect(gateway)
    extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = parse(read_until_closed(extra))
    for sock in held:
        sock.close()
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert json.loads(body)["error"]["type"] == "ServiceUnavailableError"
    deadline = time.monotonic() + CLOSED_WITHIN_S
    while httpx.get(f"{gateway.address}/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_stream_longer_than_every_timeout_is_not_cut(gateway: Proc) -> None:
    longest = max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S, IDLE_TIMEOUT_S)
    started = time.monotonic()
    r = httpx.post(
        f"{gateway.address}/v1/chat/{FAKE_MODEL}",
        json={"prompt": "hi", "max_tokens": 20},
        timeout=30,
    )
    assert time.monotonic() - started > 2 * longest  # 20 tokens at 150 ms
    events = sse_events(r.text)
    last = events[-1][1]
    assert isinstance(last, dict) and last["finished"] is True and last["finish_reason"] == "length"
    assert len(events) == 21


def test_a_trailing_slash_is_a_404_not_a_redirect_built_from_host(gateway: Proc) -> None:
    for method, path in (("POST", f"/v1/chat/{FAKE_MODEL}/"), ("GET", "/v1/models/")):
        r = httpx.request(
            method, gateway.address + path, headers={"Host": "evil.example"}, content=b"hi"
        )
        assert r.status_code == 404, (path, r.status_code)
        assert "location" not in r.headers
        assert "evil" not in r.text and all("evil" not in v for v in r.headers.values())
        assert r.headers["content-type"].startswith("application/json")


def test_long_input_is_not_echoed_in_full(gateway: Proc) -> None:
    name = "m" * 10_000
    answers = [
        httpx.post(
            f"{gateway.address}/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "x"}]},
        ),
        httpx.post(f"{gateway.address}/v1/chat/{name}", content=b"hi"),
        httpx.post(f"{gateway.address}/v2/{name}", content=b"hi"),
        httpx.post(
            f"{gateway.address}/v1/chat/completions",
            json={"model": FAKE_MODEL, "messages": [{"role": "r" * 10_000, "content": "x"}]},
        ),
        httpx.post(
            f"{gateway.address}/v1/completions",
            json={"model": FAKE_MODEL, "prompt": "x", "x" * 10_000: 1},
        ),
    ]
    for r in answers:
        assert 400 <= r.status_code < 500, r.text[:200]
        assert len(r.content) < 600, r.text[:200]


def http10(gateway: Proc, request: bytes) -> tuple[int, dict[str, str], bytes]:
    sock = connect(gateway)
    sock.sendall(request)
    return parse(read_until_closed(sock))


def test_http_1_0_gets_no_chunked_encoding(gateway: Proc) -> None:
    status, headers, body = http10(gateway, b"GET /health HTTP/1.0\r\n\r\n")
    assert status == 200 and "transfer-encoding" not in headers
    assert headers["connection"] == "close" and int(headers["content-length"]) == len(body)
    assert json.loads(body) == {"status": "ok"}

    request = (
        f"POST /v1/chat/{FAKE_MODEL} HTTP/1.0\r\nContent-Type: application/json\r\n"
        'Content-Length: 33\r\n\r\n{"prompt": "hi", "max_tokens": 3}'
    ).encode()
    status, headers, body = http10(gateway, request)
    assert status == 200 and "transfer-encoding" not in headers
    assert headers["connection"] == "close" and "content-length" not in headers
    assert headers["content-type"].startswith("text/event-stream")
    events = sse_events(body.decode())  # the body as sent: no chunk sizes in it
    assert len(events) == 4 and events[-1][1]["finished"] is True  # type: ignore[index]


@pytest.mark.parametrize(
    ("path", "ctype"), [(f"/v1/chat/{FAKE_MODEL}", "text/plain"), ("/tokenize", "application/json")]
)
def test_a_client_leaving_mid_body_is_logged_without_a_traceback(
    gateway: Proc, path: str, ctype: str
) -> None:
    sock = connect(gateway)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
        'Content-Length: 100\r\n\r\n{"prompt": '.encode()
    )
    time.sleep(0.2)  # the handler is waiting for the rest
    sock.close()
    deadline = time.monotonic() + CLOSED_WITHIN_S
    while f"client left before sending its whole request to '{path}'" not in gateway.log():
        assert time.monotonic() < deadline, gateway.log()[-2000:]
        time.sleep(0.1)
    log = gateway.log()
    assert "Traceback" not in log and "unexpected error" not in log
