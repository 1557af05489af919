"""`GenerationService` and `Gateway.serve` against in-memory replicas and an in-memory client.

The replicas are `FakeReplica`s: `ReplicaClient`s whose `submit` hands out real
`RequestSink`s that the test fills, and whose cancels are recorded instead of
written to a stream; `release` is the real one. The client is `FakeHttp`, an
ASGI `receive` that blocks until the test disconnects it and a `send` that
records messages and can stop accepting body writes. Nothing sleeps: tests
wait on conditions by yielding to the event loop.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import orjson
import pytest
from prometheus_client import REGISTRY

from gateway import generation as generation_module
from gateway import metrics
from gateway.admission import ClientLimiter
from gateway.api_models import GenerationInput, OutputOptions
from gateway.errors import ApiError
from gateway.gateway import Gateway, GatewayOptions, rejection_reason
from gateway.generation import GenerationRequest, GenerationService, build_request
from gateway.http_protocol import CYCLE_KEY
from gateway.migration import continuation
from gateway.openai_stream import RichChatFormat, RichCompletionFormat
from gateway.replica_client import Output, ReplicaClient, RequestSink
from gateway.routing_table import ModelRouter, RoutingTable
from gateway.sse import SeedFormat, StreamFormat
from mss.rpc import status_number
from protos import controller_pb2, replica_pb2

CLIENT = "10.0.0.1"


class FakeReplica(ReplicaClient):
    """A replica in memory: `submit` records the request and returns a sink the test fills.

    The sink's stream is the replica itself, so a cancel (from `release` of an
    unfinished request, or a sink overflowing) lands in `cancelled`, where the
    real stream would write a CancelRequest.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[replica_pb2.GenerateRequest] = []
        self.sinks: list[RequestSink] = []
        self.cancelled: list[str] = []

    def start(self) -> None:
        self.stats.healthy = True

    def submit(self, request: replica_pb2.GenerateRequest, buffer_limit: int) -> RequestSink:
        self.stats.in_flight += 1
        copy = replica_pb2.GenerateRequest()
        copy.CopyFrom(request)
        self.requests.append(copy)
        sink = RequestSink(request.request_id, self, buffer_limit, request.sampling.n)
        self.sinks.append(sink)
        return sink

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def close_when_idle(self, deadline_s: float) -> None:
        await self.close()

    def say(self, *texts: str, finish: str = "", usage: tuple[int, int] = (0, 0)) -> None:
        """Deltas for the latest request: one per text, the last with `finish` when given."""
        sink = self.sinks[-1]
        for i, text in enumerate(texts):
            last = i == len(texts) - 1
            sink.push(
                replica_pb2.RequestDelta(
                    request_id=sink.request_id,
                    text=text,
                    finish_reason=finish if last else "",
                    prompt_tokens=usage[0] if last else 0,
                    completion_tokens=usage[1] if last else 0,
                )
            )
        sink.flush()  # as the stream's reader does after each reply

    def fail(self, code: grpc.StatusCode, message: str = "replica failed") -> None:
        """The latest request ends with an error delta, as a replica or a broken stream sends."""
        sink = self.sinks[-1]
        error = replica_pb2.RequestError(code=status_number(code), message=message)
        sink.push(
            replica_pb2.RequestDelta(request_id=sink.request_id, finish_reason="error", error=error)
        )


class FakeHttp:
    """The client side of one ASGI request."""

    def __init__(self, body: bytes = b"") -> None:
        self.messages: list[dict[str, Any]] = []
        self.body = body
        self.gone = asyncio.Event()
        self.stalled = False
        """True: body writes block, as when the client stops reading and buffers fill."""
        self.blocked = asyncio.Event()
        """Set while a body write is blocked."""
        self._resume = asyncio.Event()
        self.direct_writes = 0
        """Body chunks written through `write_now`, past the request's handler."""
        self.on_leave: Callable[[], None] | None = None

    async def receive(self) -> dict[str, Any]:
        if self.body:
            body, self.body = self.body, b""
            return {"type": "http.request", "body": body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and self.stalled:
            self.blocked.set()
            await self._resume.wait()
            self.blocked.clear()
        self.messages.append(message)

    def write_now(self, body: bytes) -> bool:
        """The connection's synchronous write (`GatewayCycle.write_now`): refused while
        stalled, as when the client's buffer is over its high mark."""
        if self.stalled:
            return False
        self.messages.append({"type": "http.response.body", "body": body, "more_body": True})
        self.direct_writes += 1
        return True

    def watch_disconnect(self, callback: Callable[[], None] | None) -> None:
        """The connection's callback when the client goes (`GatewayCycle.watch_disconnect`)."""
        if callback is not None and self.gone.is_set():
            callback()
            return
        self.on_leave = callback

    def leave(self) -> None:
        self.gone.set()
        if self.on_leave is not None:
            self.on_leave()

    def read_again(self) -> None:
        self.stalled = False
        self._resume.set()

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def body_bytes(self) -> bytes:
        return b"".join(m["body"] for m in self.messages[1:])

    def events(self) -> list[Any]:
        """The SSE `data:` payloads received so far, decoded ([DONE] as the string)."""
        out: list[Any] = []
        for block in self.body_bytes.split(b"\n\n"):
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    data = line[len(b"data: ") :]
                    out.append(data.decode() if data == b"[DONE]" else orjson.loads(data))
        return out

    def ended(self) -> bool:
        return bool(self.messages) and self.messages[-1].get("more_body") is False


async def until(check: Callable[[], object], what: str) -> None:
    """Yield to the loop until `check()` holds; the fakes do no I/O, so this is quick."""
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def routing_table(version: int, model: str, replicas: int, **limits: int) -> Any:
    table = controller_pb2.RoutingTable(version=version)
    routes = table.models.add(model=model, strategy="round_robin", **limits)
    for i in range(replicas):
        routes.routes.add(replica_id=f"r{i}", address=f"fake:{i}")
    return table


@pytest.fixture
async def table() -> AsyncIterator[RoutingTable]:
    table = RoutingTable(client_factory=FakeReplica)
    try:
        yield table
    finally:
        await table.close()


def model_router(
    table: RoutingTable, name: str, replicas: int = 2, **limits: int
) -> tuple[ModelRouter, list[FakeReplica]]:
    table.apply(routing_table(table.version + 1, name, replicas, **limits))
    router = table.get(name)
    assert router is not None
    fakes = [c for c in router.clients.values() if isinstance(c, FakeReplica)]
    return router, fakes


def service(buffer_chunks: int = 64, per_client: int = 1) -> GenerationService:
    return GenerationService(
        retries=2,
        buffer_chunks=buffer_chunks,
        slow_client_timeout_s=5.0,
        limiter=ClientLimiter(per_client),
    )


def generation(
    model: str,
    rid: str = "rid",
    stream: bool = True,
    fmt: type[StreamFormat] = SeedFormat,
    inp: GenerationInput | None = None,
) -> GenerationRequest:
    if inp is None:
        inp = GenerationInput(prompt="hello", stream=stream, include_usage=True)
    return GenerationRequest(
        inp=inp, max_tokens=16, fmt=fmt(rid, model, inp, "fp"), client_key=CLIENT
    )


def start(
    svc: GenerationService, router: ModelRouter, http: FakeHttp, request: GenerationRequest
) -> asyncio.Task[int]:
    return asyncio.create_task(svc.run({}, http.receive, http.send, router, request))


def assert_released(svc: GenerationService, router: ModelRouter, fakes: list[FakeReplica]) -> None:
    """Every slot and counter the request took is back."""
    assert router.admission.in_flight == 0 and router.admission.queued == 0
    assert all(f.stats.in_flight == 0 for f in fakes)
    assert not svc.flows
    svc.limiter.acquire(CLIENT)  # the per-client slot (limit 1) is free again
    svc.limiter.release(CLIENT)


async def test_a_stream_sends_tokens_in_order_then_usage(table: RoutingTable) -> None:
    router, fakes = model_router(table, "normal")
    svc, http = service(), FakeHttp()
    task = start(svc, router, http, generation("normal"))
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    assert fakes[0].requests[0].request_id == "rid"
    fakes[0].say("Hel", "lo")
    await until(lambda: len(http.events()) == 2, "the first tokens")
    fakes[0].say(", world", finish="stop", usage=(3, 3))

    assert await task == 200
    assert http.status == 200
    assert http.headers[b"content-type"].startswith(b"text/event-stream")
    assert http.headers[b"x-request-id"] == b"rid"
    *tokens, last = http.events()
    assert [t["token"] for t in tokens] == ["Hel", "lo", ", world"]
    assert not any(t["finished"] for t in tokens)
    assert last["finished"] and last["finish_reason"] == "stop"
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert http.ended()
    assert fakes[0].cancelled == [] and fakes[1].requests == []  # finished: nothing to cancel
    assert_released(svc, router, fakes)


async def test_tokens_written_at_once_keep_their_order_with_the_handler_s(
    table: RoutingTable,
) -> None:
    """With the connection's synchronous write, tokens after the first go out as they
    arrive, past the handler; while the client's buffer is full they queue for the
    handler, and the next ones wait behind them; the finish is always the handler's."""
    router, fakes = model_router(table, "direct")
    svc, http = service(), FakeHttp()
    scope = {"extensions": {CYCLE_KEY: weakref.ref(http)}}
    task = asyncio.create_task(
        svc.run(scope, http.receive, http.send, router, generation("direct"))
    )
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    fakes[0].say("a")
    await until(lambda: len(http.events()) == 1, "the first token")
    assert http.direct_writes == 0  # the first token (and the head) are the handler's
    fakes[0].say("b", "c")  # one reply: one write
    assert http.direct_writes == 1 and len(http.events()) == 3  # written at once
    http.stalled = True
    fakes[0].say("d")  # refused: queued for the handler, whose write blocks
    await until(lambda: http.blocked.is_set(), "the handler's write to block")
    fakes[0].say("e")  # behind "d": queued, not written past it
    assert http.direct_writes == 1
    http.read_again()
    await until(lambda: len(http.events()) == 5, "the queued tokens")
    fakes[0].say("f")
    await until(lambda: len(http.events()) == 6, "a token after the queue emptied")
    fakes[0].say("g", finish="stop", usage=(1, 7))
    assert await task == 200
    *tokens, last = http.events()
    assert [t["token"] for t in tokens] == ["a", "b", "c", "d", "e", "f", "g"]
    assert last["finished"] and http.ended()
    assert http.direct_writes == 2  # b and c together, then f
    assert_released(svc, router, fakes)


async def test_a_whole_response_is_one_json_body(table: RoutingTable) -> None:
    router, fakes = model_router(table, "whole")
    svc, http = service(), FakeHttp()
    task = start(svc, router, http, generation("whole", stream=False, fmt=RichChatFormat))
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    fakes[0].say("a", "b", finish="length", usage=(1, 2))

    assert await task == 200
    assert http.status == 200 and http.headers[b"content-type"] == b"application/json"
    body = orjson.loads(http.body_bytes)
    assert body["choices"][0]["message"]["content"] == "ab"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 3
    assert_released(svc, router, fakes)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
async def test_a_failure_before_the_first_token_is_retried_on_another_replica(
    table: RoutingTable, code: grpc.StatusCode
) -> None:
    router, fakes = model_router(table, f"retry-{code.name}")
    svc, http = service(), FakeHttp()
    task = start(svc, router, http, generation(router.name))
    await until(lambda: fakes[0].sinks, "the first attempt")
    fakes[0].fail(code)
    await until(lambda: fakes[1].sinks, "the retry")
    assert fakes[1].requests[0].request_id == "rid.1"  # a new id: never mixed with the first
    fakes[1].say("ok", finish="stop", usage=(1, 1))

    assert await task == 200
    assert [e["token"] for e in http.events()] == ["ok", ""]
    assert fakes[0].cancelled == []  # the failed attempt had ended already
    assert_released(svc, router, fakes)


def say_ids(fake: FakeReplica, text: str, ids: list[int], finish: str = "", usage: int = 0) -> None:
    """A delta with its token ids for the latest request, as a replica sends them."""
    sink = fake.sinks[-1]
    sink.push(
        replica_pb2.RequestDelta(
            request_id=sink.request_id,
            text=text,
            token_ids=ids,
            num_tokens=len(ids),
            finish_reason=finish,
            prompt_tokens=2 if finish else 0,
            completion_tokens=usage,
        )
    )
    sink.flush()


@pytest.mark.parametrize("write_now", [False, True], ids=["handler", "write-now"])
async def test_a_replica_failing_after_the_first_token_hands_the_rest_to_another(
    table: RoutingTable, write_now: bool
) -> None:
    """The same whether the tokens go through the handler or are written at once (the
    continuation's first token then too)."""
    router, fakes = model_router(table, "late-failure")
    svc, http = service(), FakeHttp()
    scope = {"extensions": {CYCLE_KEY: weakref.ref(http)}} if write_now else {}
    moved = metrics.MIGRATIONS.labels("late-failure", "unavailable", "moved")
    moved_before = moved._value.get()
    task = asyncio.create_task(
        svc.run(scope, http.receive, http.send, router, generation("late-failure"))
    )
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    say_ids(fakes[0], "partial", [7])
    await until(lambda: http.events(), "the first token")
    say_ids(fakes[0], " text", [8, 9])
    await until(lambda: len(http.events()) == 2, "the second token")
    fakes[0].stats.healthy = False  # what a broken stream or UNAVAILABLE does to a replica
    fakes[0].fail(grpc.StatusCode.UNAVAILABLE, "engine died")

    await until(lambda: fakes[1].sinks, "the continuation reaching the other replica")
    cont = fakes[1].requests[0]
    assert list(cont.resume.token_ids) == [7, 8, 9]
    assert not cont.resume.HasField("text_chars")  # no stop strings: nothing was held back
    assert cont.sampling.max_tokens == 16 - 3 and cont.prompt == "hello"
    assert cont.request_id == "rid.m1"
    await until(lambda: fakes[1].sinks[-1]._waiter is not None, "the handler to wait")
    say_ids(fakes[1], " goes on", [10])
    say_ids(fakes[1], "", [], finish="stop", usage=1)

    assert await task == 200
    assert http.direct_writes == (2 if write_now else 0)  # " text", " goes on"
    events = http.events()
    assert [e["token"] for e in events] == ["partial", " text", " goes on", ""]
    assert events[-1]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == 4  # 3 before the move, 1 after
    assert b"event: error" not in http.body_bytes
    assert moved._value.get() == moved_before + 1
    assert_released(svc, router, fakes)


def two_hosts(table: RoutingTable, name: str) -> tuple[ModelRouter, dict[str, FakeReplica]]:
    """Replicas a0 and a1 on host a, b0 on host b, taken in that order by round robin."""
    proto = controller_pb2.RoutingTable(version=table.version + 1)
    routes = proto.models.add(model=name, strategy="round_robin")
    for rid, address in (
        ("a0", "10.0.0.2:50100"),
        ("a1", "10.0.0.2:50101"),
        ("b0", "10.0.0.3:50100"),
    ):
        routes.routes.add(replica_id=rid, address=address)
    table.apply(proto)
    router = table.get(name)
    assert router is not None
    fakes = {rid: c for rid, c in router.clients.items() if isinstance(c, FakeReplica)}
    return router, fakes


async def test_a_request_moves_off_a_failed_replicas_host_while_another_host_has_room(
    table: RoutingTable,
) -> None:
    # A cut-off host's replicas fail one keepalive at a time: moving to a0's neighbour
    # would stall the stream twice.
    router, fakes = two_hosts(table, "hosts")
    svc, http = service(), FakeHttp()
    task = start(svc, router, http, generation("hosts"))
    await until(lambda: fakes["a0"].sinks, "the request reaching a0")
    say_ids(fakes["a0"], "partial", [7])
    await until(lambda: http.events(), "the first token")
    fakes["a0"].fail(grpc.StatusCode.UNAVAILABLE, "keepalive watchdog timeout")

    await until(lambda: fakes["b0"].sinks, "the continuation reaching host b")
    assert fakes["a1"].requests == []
    say_ids(fakes["b0"], " rest", [8], finish="stop", usage=1)
    assert await task == 200
    assert [e["token"] for e in http.events()] == ["partial", " rest", ""]
    assert_released(svc, router, list(fakes.values()))


async def test_a_retry_before_the_first_token_prefers_another_host(table: RoutingTable) -> None:
    router, fakes = two_hosts(table, "hosts-retry")
    svc, http = service(), FakeHttp()
    task = start(svc, router, http, generation("hosts-retry"))
    await until(lambda: fakes["a0"].sinks, "the first attempt on a0")
    fakes["a0"].fail(grpc.StatusCode.UNAVAILABLE)
    await until(lambda: fakes["b0"].sinks, "the retry on host b")
    assert fakes["a1"].requests == []
    fakes["b0"].say("ok", finish="stop", usage=(1, 1))
    assert await task == 200
    assert_released(svc, router, list(fakes.values()))


async def test_a_request_that_cannot_move_ends_with_an_error_event(
    table: RoutingTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation_module, "MIGRATION_WAIT_S", 0.2)
    router, fakes = model_router(table, "nowhere", replicas=1)
    svc, http = service(), FakeHttp()
    task = start(svc, router, http, generation("nowhere"))
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    say_ids(fakes[0], "partial", [7])
    await until(lambda: http.events(), "the first token")
    fakes[0].stats.healthy = False
    fakes[0].fail(grpc.StatusCode.UNAVAILABLE, "engine died")

    assert await task == 200  # the status went out with the first token
    first, error = http.events()
    assert first["token"] == "partial"
    assert error["finished"] and error["finish_reason"] == "error"
    assert error["error"]["code"] == 503 and error["error"]["type"] == "ServiceUnavailableError"
    assert "engine died" in error["error"]["message"]
    assert b"event: error" in http.body_bytes and http.ended()
    assert len(fakes[0].requests) == 1  # never sent again to the failed replica
    assert metrics.MIGRATIONS.labels("nowhere", "unavailable", "gave_up")._value.get() == 1
    assert_released(svc, router, fakes)


def test_a_continuation_resumes_after_the_output_with_the_bounds_reduced() -> None:
    request = build_request(GenerationInput(prompt="hello"), "rid", 10)
    request.sampling.min_tokens = 4
    request.sampling.prompt_logprobs = 2
    output = Output(count_text=True)
    output.token_ids.extend([1, 2, 3])
    output.text_chars = 9
    cont = continuation(request, output, "rid.m1")
    assert cont.request_id == "rid.m1" and cont.prompt == "hello"
    assert cont.sampling.max_tokens == 7 and cont.sampling.min_tokens == 1
    assert not cont.sampling.HasField("prompt_logprobs")
    assert list(cont.resume.token_ids) == [1, 2, 3] and cont.resume.text_chars == 9
    assert request.request_id == "rid" and not request.HasField("resume")  # left as it was


async def test_the_text_received_is_counted_only_when_a_replica_may_hold_text_back() -> None:
    sink = RequestSink("r", FakeReplica("m", "r0", "fake:0"), 64)
    sink.output = Output(count_text=True)
    for text, ids in (("a", [1]), (" bc", [2, 3])):
        sink.push(replica_pb2.RequestDelta(request_id="r", text=text, token_ids=ids))
    assert sink.output.token_ids == [1, 2, 3] and sink.output.text_chars == 4
    plain = RequestSink("q", FakeReplica("m", "r1", "fake:1"), 64)
    plain.output = Output()
    plain.push(replica_pb2.RequestDelta(request_id="q", text="abc", token_ids=[5]))
    assert plain.output.token_ids == [5] and plain.output.text_chars == 0


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.OUT_OF_RANGE, 400),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 502),
    ],
)
async def test_a_failure_that_is_not_retryable_is_answered_with_its_status(
    table: RoutingTable, code: grpc.StatusCode, status: int
) -> None:
    router, fakes = model_router(table, f"fatal-{code.name}")
    svc, http = service(), FakeHttp()
    task = start(svc, router, http, generation(router.name))
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    fakes[0].fail(code, "no good")

    with pytest.raises(ApiError) as info:
        await task
    assert (info.value.status, info.value.code) == (status, code.name.lower())
    assert info.value.message == "no good" and info.value.retry_after is None
    assert http.messages == []  # nothing sent: the caller answers the error
    assert fakes[1].requests == []
    assert_released(svc, router, fakes)


async def test_retries_exhausted_and_no_replica_are_503(table: RoutingTable) -> None:
    router, fakes = model_router(table, "exhausted")
    svc = service()
    task = start(svc, router, FakeHttp(), generation("exhausted"))
    await until(lambda: fakes[0].sinks, "the first attempt")
    fakes[0].fail(grpc.StatusCode.UNAVAILABLE, "draining")
    await until(lambda: fakes[1].sinks, "the second attempt")
    fakes[1].fail(grpc.StatusCode.UNAVAILABLE, "draining")  # a third attempt finds none left
    with pytest.raises(ApiError) as info:
        await task
    assert (info.value.status, info.value.code) == (503, "unavailable")
    assert info.value.retry_after == 1.0

    for fake in fakes:
        fake.stats.healthy = False
    with pytest.raises(ApiError) as info:
        await start(svc, router, FakeHttp(), generation("exhausted"))
    assert (info.value.status, info.value.code) == (503, "no_replica")
    assert_released(svc, router, fakes)


async def test_a_client_that_leaves_mid_stream_cancels_its_replica_request(
    table: RoutingTable,
) -> None:
    router, fakes = model_router(table, "leaver")
    svc, http = service(), FakeHttp()
    task = start(svc, router, http, generation("leaver"))
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    fakes[0].say("a")
    await until(lambda: http.events(), "the first token")
    assert router.admission.in_flight == 1 and fakes[0].stats.in_flight == 1
    http.leave()

    assert await task == 499
    assert fakes[0].cancelled == ["rid"]
    assert_released(svc, router, fakes)


async def test_a_client_that_leaves_before_the_first_token_cancels_too(
    table: RoutingTable,
) -> None:
    router, fakes = model_router(table, "early-leaver")
    svc, http = service(), FakeHttp()
    task = start(svc, router, http, generation("early-leaver"))
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    http.leave()

    assert await task == 499
    assert fakes[0].cancelled == ["rid"] and http.messages == []
    assert_released(svc, router, fakes)


async def test_a_client_that_leaves_the_queue_gives_its_place_back(table: RoutingTable) -> None:
    router, fakes = model_router(table, "queue", max_in_flight=1, max_queue=4)
    svc = service(per_client=0)
    first, waiting = FakeHttp(), FakeHttp()
    running = start(svc, router, first, generation("queue", "a"))
    await until(lambda: fakes[0].sinks, "the first request running")
    queued = start(svc, router, waiting, generation("queue", "b"))
    await until(lambda: router.admission.queued == 1, "the second request queued")
    waiting.leave()

    assert await queued == 499
    assert router.admission.queued == 0 and router.admission.in_flight == 1
    assert len(fakes[0].requests) + len(fakes[1].requests) == 1  # never reached a replica
    fakes[0].say("done", finish="stop")
    assert await running == 200
    assert router.admission.in_flight == 0


async def test_a_client_too_slow_for_the_stream_buffer_is_dropped(table: RoutingTable) -> None:
    router, fakes = model_router(table, "overflow")
    svc, http = service(buffer_chunks=2), FakeHttp()
    task = start(svc, router, http, generation("overflow"))
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    http.stalled = True
    fakes[0].say("t0")
    await until(http.blocked.is_set, "a write blocked on the client")
    fakes[0].say("t1", "t2", "t3")  # three unread deltas: over the buffer of two
    assert fakes[0].cancelled == ["rid"]  # the replica stops at once, not when the client reads
    http.read_again()

    assert await task == 200
    *tokens, error = http.events()
    assert [t["token"] for t in tokens] == ["t0", "t1", "t2", "t3"]
    assert "too slowly" in error["error"]["message"] and http.ended()
    assert fakes[0].cancelled == ["rid"]  # once
    assert_released(svc, router, fakes)


async def test_a_client_that_stops_reading_is_dropped_by_the_watchdog(table: RoutingTable) -> None:
    router, fakes = model_router(table, "stalled")
    svc, http = service(), FakeHttp()
    task = start(svc, router, http, generation("stalled"))
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    http.stalled = True
    fakes[0].say("t0")
    await until(http.blocked.is_set, "a write blocked on the client")
    now = asyncio.get_running_loop().time()
    svc.drop_slow_clients(now)  # within the timeout: kept
    assert not task.done() and svc.flows
    svc.drop_slow_clients(now + svc.slow_client_timeout_s + 1)

    assert await task == 499
    assert fakes[0].cancelled == ["rid"]
    assert_released(svc, router, fakes)


def test_rejections_are_refusals_not_outages() -> None:
    assert rejection_reason(ApiError(400, "bad")) == "invalid"
    assert rejection_reason(ApiError(404, "no such model")) == "invalid"
    assert rejection_reason(ApiError(401, "key")) == "auth"
    assert rejection_reason(ApiError(429, "slow down")) == "rate"
    assert rejection_reason(ApiError(503, "full", code="capacity")) == "capacity"
    assert rejection_reason(ApiError(503, "none ready", code="no_replica")) is None
    assert rejection_reason(ApiError(502, "replica failed")) is None
    assert rejection_reason(ApiError(504, "replica timed out")) is None


def sample(name: str, **labels: str) -> float:
    """The exported value, as a scrape sees it (the batches flushed)."""
    metrics.flush()
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_serve_reads_routes_and_streams_and_counts_refusals_once() -> None:
    gateway = Gateway(GatewayOptions())
    gateway.table = RoutingTable(client_factory=FakeReplica)
    router, fakes = model_router(gateway.table, "served")
    router.admission.resize(1, 0)  # one slot, no queue (a table's 0 means "the default")
    route = "/v1/chat/{model}"
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/served",
        "headers": [(b"content-type", b"text/plain")],
        "state": {"request_id": "rid-1"},
    }
    try:
        ok = FakeHttp(b"hello")
        serving = asyncio.create_task(gateway.serve(scope, ok.receive, ok.send, route, "served"))
        await until(lambda: fakes[0].sinks, "the request reaching a replica")
        assert fakes[0].sinks[0].request_id == "rid-1"

        full = FakeHttp(b"hello")  # the model's one slot is taken and it has no queue
        await gateway.serve(scope, full.receive, full.send, route, "served")
        assert full.status == 503 and full.headers[b"retry-after"] == b"1"
        assert orjson.loads(full.body_bytes)["error"]["code"] == 503
        assert sample("mss_gateway_rejections_total", model="served", reason="capacity") == 1

        invalid_before = sample("mss_gateway_rejections_total", model="", reason="invalid")
        unknown = FakeHttp(b"{bad json")  # unknown model in the path: 404 whatever the body
        await gateway.serve(scope, unknown.receive, unknown.send, route, "nope")
        assert unknown.status == 404
        error = orjson.loads(unknown.body_bytes)["error"]
        assert error["code"] == 404 and error["type"] == "NotFoundError"
        after = sample("mss_gateway_rejections_total", model="", reason="invalid")
        assert after == invalid_before + 1

        fakes[0].say("hi", finish="stop")
        await serving
        assert ok.status == 200 and ok.headers[b"x-request-id"] == b"rid-1"
        for status, count in (("200", 1), ("503", 1)):
            labels = {"model": "served", "route": route, "code": status}
            assert sample("mss_gateway_requests_total", **labels) == count
    finally:
        await gateway.table.close()


def push(fake: FakeReplica, **fields: Any) -> None:
    sink = fake.sinks[-1]
    sink.push(replica_pb2.RequestDelta(request_id=sink.request_id, **fields))


async def test_n_choices_stream_until_every_choice_finished(table: RoutingTable) -> None:
    router, fakes = model_router(table, "choices")
    svc, http = service(), FakeHttp()
    inp = GenerationInput(
        messages=[replica_pb2.ChatMessage(role="user", content="hi")],
        sampling=replica_pb2.SamplingParams(n=2),
        include_usage=True,
        output=OutputOptions(n=2),
    )
    task = start(svc, router, http, generation("choices", fmt=RichChatFormat, inp=inp))
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    assert fakes[0].requests[0].sampling.n == 2 and fakes[0].requests[0].sampling.max_tokens == 16
    push(fakes[0], index=0, text="A", num_tokens=1, prompt_token_ids=[1, 2])
    push(fakes[0], index=1, text="B", num_tokens=1)
    push(fakes[0], index=0, text="a", num_tokens=1, finish_reason="stop")
    await until(lambda: len(http.events()) == 5, "two role chunks and three deltas")
    assert not task.done() and not fakes[0].sinks[0].ended  # choice 1 is still running
    push(
        fakes[0],
        index=1,
        text="b",
        num_tokens=1,
        finish_reason="length",
        prompt_tokens=2,
        completion_tokens=4,
    )

    assert await task == 200
    *chunks, usage, done = http.events()
    texts = {0: "", 1: ""}
    for c in chunks:
        choice = c["choices"][0]
        texts[choice["index"]] += choice["delta"].get("content", "")
    assert texts == {0: "Aa", 1: "Bb"}
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert reasons == ["stop", "length"]
    assert usage["usage"]["completion_tokens"] == 4 and done == "[DONE]"
    assert fakes[0].cancelled == []
    assert_released(svc, router, fakes)


async def test_an_error_ends_a_request_of_n_choices_at_once(table: RoutingTable) -> None:
    router, fakes = model_router(table, "choices-error")
    svc, http = service(), FakeHttp()
    inp = GenerationInput(
        prompt="p", sampling=replica_pb2.SamplingParams(n=3), output=OutputOptions(n=3)
    )
    task = start(svc, router, http, generation("choices-error", fmt=RichCompletionFormat, inp=inp))
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    push(fakes[0], index=0, text="x", num_tokens=1)
    await until(lambda: http.events(), "the first chunk")
    fakes[0].fail(grpc.StatusCode.INTERNAL, "engine died")
    assert await task == 200
    *_, error, done = http.events()
    assert error["error"]["code"] == 502 and "engine died" in error["error"]["message"]
    assert done == "[DONE]" and fakes[0].sinks[0].ended
    assert_released(svc, router, fakes)


async def test_a_whole_body_of_n_choices(table: RoutingTable) -> None:
    router, fakes = model_router(table, "choices-whole")
    svc, http = service(), FakeHttp()
    inp = GenerationInput(
        prompt="p",
        stream=False,
        sampling=replica_pb2.SamplingParams(n=2),
        output=OutputOptions(n=2),
    )
    task = start(svc, router, http, generation("choices-whole", fmt=RichCompletionFormat, inp=inp))
    await until(lambda: fakes[0].sinks, "the request reaching a replica")
    push(fakes[0], index=1, text="y", num_tokens=1, finish_reason="stop", stop_reason="7")
    push(
        fakes[0],
        index=0,
        text="x",
        num_tokens=1,
        finish_reason="length",
        prompt_tokens=1,
        completion_tokens=2,
    )
    assert await task == 200
    body = orjson.loads(http.body_bytes)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "x", "length"),
        (1, "y", "stop"),
    ]
    assert body["choices"][1]["stop_reason"] == 7 and body["usage"]["total_tokens"] == 3
    assert_released(svc, router, fakes)
