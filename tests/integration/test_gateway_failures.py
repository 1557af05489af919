"""Failure handling through real processes: cancellation, retries, limits, slow readers.

Each test starts its own fake-engine replicas and gateway so it can kill them
or give them tight limits; the replica's Health load is the proof that an
abandoned request was really cancelled in the engine.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import httpx

from tests.support import Proc, health, spawn, sse_events, start_gateway, start_replica

MODEL = "smollm2"


def metric(gateway: Proc, name: str, **labels: str) -> float:
    """Sum of a gateway metric's samples whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{gateway.address}/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_for(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def idle(replica: Proc) -> bool:
    load = health(replica.address).load
    return load.running == 0 and load.in_flight == 0


async def stream_tokens(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> list[str]:
    """Tokens of one seed-route stream; raises when it does not end with `finished: true`."""
    async with client.stream("POST", f"{url}/v1/chat/{MODEL}", json=body) as r:
        assert r.status_code == 200, await r.aread()
        text = (await r.aread()).decode()
    events = sse_events(text)
    name, last = events[-1]
    assert name is None and isinstance(last, dict) and last["finished"] is True, events[-1]
    return [str(d["token"]) for _, d in events[:-1] if isinstance(d, dict)]


async def test_client_disconnect_aborts_the_engine_request() -> None:
    replica = start_replica(token_interval_ms=10)
    gateway = start_gateway([(MODEL, replica.address)])
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream(
                "POST",
                f"{gateway.address}/v1/chat/{MODEL}",
                json={"prompt": "go", "max_tokens": 1000},
            ) as r:
                assert r.status_code == 200
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data:")
                    if seen == 5:
                        break
                load = health(replica.address).load
                assert load.running == 1 and load.in_flight == 1
            # The response is closed mid-stream: the engine must drop the request.
            await wait_for(lambda: idle(replica), 3.0, "the replica to report nothing running")
            assert metric(gateway, "mss_gateway_client_disconnects_total") == 1
            assert metric(gateway, "mss_gateway_aborts_total") == 1
            # Same for the OpenAI route, disconnected before the first token arrives.
            slow = start_replica(token_interval_ms=2000)
            try:
                other = start_gateway([(MODEL, slow.address)])
                try:
                    task = asyncio.create_task(
                        client.post(
                            f"{other.address}/v1/completions",
                            json={"model": MODEL, "prompt": "x", "max_tokens": 5, "stream": True},
                        )
                    )
                    await wait_for(
                        lambda: health(slow.address).load.in_flight == 1, 3.0, "admission"
                    )
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    await wait_for(lambda: idle(slow), 3.0, "the abort before the first token")
                finally:
                    other.stop()
            finally:
                slow.stop()
            # The replica serves the next request normally.
            tokens = await stream_tokens(client, gateway.address, {"prompt": "go", "max_tokens": 4})
            assert len(tokens) == 4
    finally:
        gateway.stop()
        replica.stop()


async def test_retry_past_a_killed_replica_with_zero_failed_requests() -> None:
    replicas = [start_replica(token_interval_ms=2) for _ in range(2)]
    gateway = start_gateway(
        [(MODEL, r.address) for r in replicas], extra=["--routing", "round_robin"]
    )
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"prompt": "retry me", "max_tokens": 8}
            for _ in range(4):  # opens the Generate streams to both replicas
                assert len(await stream_tokens(client, gateway.address, body)) == 8
            replicas[0].kill()
            results = await asyncio.gather(
                *(stream_tokens(client, gateway.address, body) for _ in range(30))
            )
            assert all(len(tokens) == 8 for tokens in results)
            assert len({"".join(t) for t in results}) == 1  # full, identical, no duplicates
            assert metric(gateway, "mss_gateway_retries_total") >= 1
            assert metric(gateway, "mss_gateway_requests_total", code="200") == 34
            ready = (await client.get(f"{gateway.address}/ready")).json()
            assert ready["ready_replicas"] == {MODEL: 1}  # the dead one left the rotation
    finally:
        gateway.stop()
        for r in replicas:
            r.stop()


async def test_failure_after_the_first_token_ends_with_an_error_event() -> None:
    replica = start_replica(token_interval_ms=10)
    gateway = start_gateway([(MODEL, replica.address)])
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream(
                "POST",
                f"{gateway.address}/v1/chat/{MODEL}",
                json={"prompt": "x", "max_tokens": 500},
            ) as r:
                text = ""
                async for chunk in r.aiter_text():
                    text += chunk
                    if text.count("data:") == 5 and replica.alive():
                        replica.kill()
        events = sse_events(text)
        name, last = events[-1]
        assert name == "error" and isinstance(last, dict)
        assert "failed after output began" in last["error"]["message"]  # type: ignore[index]
        tokens = [d["token"] for n, d in events[:-1] if isinstance(d, dict)]
        assert 5 <= len(tokens) < 500
        assert all(d["finished"] is False for _, d in events[:-1] if isinstance(d, dict))
    finally:
        gateway.stop()
        replica.stop()


LIMITED = f"""
gateway:
  max_in_flight_per_client: {{per_client}}
deployments:
  - name: {MODEL}
    engine: fake
    model: fake
    limits: {{{{max_in_flight: 2, max_queue: 1}}}}
"""


async def test_capacity_answers_503_with_retry_after_at_once() -> None:
    replica = start_replica(token_interval_ms=25)
    gateway = start_gateway([(MODEL, replica.address)], config=LIMITED.format(per_client=0))
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"prompt": "x", "max_tokens": 30}
            running = [
                asyncio.create_task(stream_tokens(client, gateway.address, body)) for _ in range(3)
            ]
            await wait_for(lambda: health(replica.address).load.in_flight == 2, 3.0, "two streams")
            await asyncio.sleep(0.1)
            started = time.monotonic()
            r = await client.post(f"{gateway.address}/v1/chat/{MODEL}", json=body)
            assert time.monotonic() - started < 0.5  # refused at once, not queued
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == 503
            oai = await client.post(
                f"{gateway.address}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
            )
            assert oai.status_code == 503
            assert oai.json()["error"]["type"] == "ServiceUnavailableError"
            results = await asyncio.gather(*running)  # the queued one got a slot and finished
            assert [len(t) for t in results] == [30, 30, 30]
            assert metric(gateway, "mss_gateway_rejections_total", reason="capacity") == 2
    finally:
        gateway.stop()
        replica.stop()


async def test_per_client_limit_answers_429() -> None:
    replica = start_replica(token_interval_ms=20)
    gateway = start_gateway([(MODEL, replica.address)], config=LIMITED.format(per_client=1))
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            first = asyncio.create_task(
                stream_tokens(client, gateway.address, {"prompt": "x", "max_tokens": 20})
            )
            await wait_for(lambda: health(replica.address).load.in_flight == 1, 3.0, "first stream")
            r = await client.post(f"{gateway.address}/v1/chat/{MODEL}", json={"prompt": "y"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "RateLimitError"
            assert len(await first) == 20
            assert metric(gateway, "mss_gateway_rejections_total", reason="rate") == 1
    finally:
        gateway.stop()
        replica.stop()


SLOW = f"""
gateway:
  slow_client_timeout_s: 1.0
  client_send_buffer_bytes: 8192
deployments:
  - name: {MODEL}
    engine: fake
    model: fake
    limits: {{max_tokens: 400000}}
"""


async def test_slow_reader_is_dropped_while_other_streams_finish() -> None:
    replica = start_replica(token_interval_ms=1, extra_args=["--max-model-len", "500000"])
    gateway = start_gateway([(MODEL, replica.address)], config=SLOW)
    sock = socket.socket()
    try:
        # A client that sends its request and then never reads.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        port = int(gateway.address.rsplit(":", 1)[1])
        sock.connect(("127.0.0.1", port))
        body = b'{"prompt": "never read", "max_tokens": 400000}'
        sock.sendall(
            b"POST /v1/chat/smollm2 HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        async with httpx.AsyncClient(timeout=30) as client:
            # Other clients stream normally while the slow one fills its buffers.
            started = time.monotonic()
            finished = 0
            while time.monotonic() - started < 4.0:
                batch = await asyncio.gather(
                    *(
                        stream_tokens(client, gateway.address, {"prompt": "ok", "max_tokens": 100})
                        for _ in range(8)
                    )
                )
                assert all(len(t) == 100 for t in batch)
                finished += len(batch)
            assert finished >= 16
            await wait_for(
                lambda: metric(gateway, "mss_gateway_client_disconnects_total") >= 1,
                10.0,
                "the slow client to be dropped",
            )
            await wait_for(lambda: idle(replica), 3.0, "the slow request's abort")
        # The server closed the slow client's connection: draining it ends in EOF or reset.
        sock.settimeout(5.0)
        closed = False
        try:
            while sock.recv(1 << 16):
                pass
            closed = True
        except ConnectionResetError:
            closed = True
        assert closed
        assert "dropping" in gateway.log()
    finally:
        sock.close()
        gateway.stop()
        replica.stop()


async def test_a_replica_that_comes_back_rejoins_the_rotation() -> None:
    replica = start_replica(token_interval_ms=2)
    port = replica.address.rsplit(":", 1)[1]
    gateway = start_gateway([(MODEL, replica.address)])
    again: Proc | None = None
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            url = gateway.address
            assert len(await stream_tokens(client, url, {"prompt": "a", "max_tokens": 3})) == 3
            replica.kill()
            r = await client.post(f"{url}/v1/chat/{MODEL}", json={"prompt": "a", "max_tokens": 3})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"

            async def ready() -> bool:
                return (await client.get(f"{url}/ready")).status_code == 200

            for _ in range(50):
                if not await ready():
                    break
                await asyncio.sleep(0.1)
            assert not await ready()  # failures past the threshold: out of the rotation
            again = spawn(
                [
                    "replica",
                    "--engine",
                    "fake",
                    "--name",
                    MODEL,
                    "--port",
                    port,
                    "--token-interval-ms",
                    "2",
                ],
                f"replica-{port}",
            )
            again.address = replica.address
            deadline = time.monotonic() + 15
            while not await ready():
                assert time.monotonic() < deadline, "the restarted replica did not rejoin"
                await asyncio.sleep(0.1)
            assert len(await stream_tokens(client, url, {"prompt": "a", "max_tokens": 3})) == 3
    finally:
        gateway.stop()
        replica.stop()
        if again is not None:
            again.stop()
