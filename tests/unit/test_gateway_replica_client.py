"""The replica client against a scripted in-process Replica servicer.

Covers multiplexing by request id, ordering of first outputs, cancellation on
release and on buffer overflow, stream failure, and health transitions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial

import grpc
import pytest

from gateway.replica_client import (
    UNAPPLIED_LIMIT,
    UNAVAILABLE,
    WRITE_SLICE_S,
    ReplicaClient,
    RequestSink,
)
from protos import replica_pb2, replica_pb2_grpc

MODEL = "m"


class ScriptedReplica(replica_pb2_grpc.ReplicaServicer):
    """Records what the gateway sends; the test decides what it answers."""

    def __init__(self) -> None:
        self.ready = True
        self.requests: list[str] = []
        self.cancels: list[str] = []
        self.batches = 0
        self.messages: list[tuple[str | None, int]] = []
        """Each message's kind and count of consumed replies."""
        self.replies: asyncio.Queue[replica_pb2.GenerateReply | None] = asyncio.Queue()
        self.received = asyncio.Event()

    async def Health(
        self, request: replica_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> replica_pb2.HealthResponse:
        return replica_pb2.HealthResponse(
            ready=self.ready,
            model=MODEL,
            load=replica_pb2.Load(max_in_flight=8, prefix_cache_hit_rate=0.25),
            max_model_len=2048,
        )

    async def Tokenize(
        self, request: replica_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> replica_pb2.TokenizeResponse:
        if request.prompt == "slow":
            await asyncio.sleep(30)
        return replica_pb2.TokenizeResponse(
            tokens=[len(w) for w in request.prompt.split()], max_model_len=2048
        )

    async def Detokenize(
        self, request: replica_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> replica_pb2.DetokenizeResponse:
        if any(t > 100 for t in request.tokens):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "tokens: 101 is out of range")
        return replica_pb2.DetokenizeResponse(prompt=" ".join("x" * t for t in request.tokens))

    async def Generate(
        self,
        request_iterator: AsyncIterator[replica_pb2.GenerateClientMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[replica_pb2.GenerateReply]:
        async def read() -> None:
            async for message in request_iterator:
                self.messages.append((message.WhichOneof("kind"), message.consumed))
                if message.WhichOneof("kind") is None:
                    continue
                if message.WhichOneof("kind") == "batch":
                    self.batches += 1
                    items = list(message.batch.messages)
                else:
                    items = [message]
                for item in items:
                    if item.WhichOneof("kind") == "request":
                        self.requests.append(item.request.request_id)
                    else:
                        self.cancels.append(item.cancel.request_id)
                self.received.set()

        reader = asyncio.create_task(read())
        try:
            while (reply := await self.replies.get()) is not None:
                yield reply
            await context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")
        finally:
            reader.cancel()


def delta(rid: str, text: str, finish: str = "") -> replica_pb2.RequestDelta:
    return replica_pb2.RequestDelta(request_id=rid, text=text, num_tokens=1, finish_reason=finish)


@pytest.fixture
async def replica() -> AsyncIterator[tuple[ScriptedReplica, str]]:
    servicer = ScriptedReplica()
    server = grpc.aio.server()
    replica_pb2_grpc.add_ReplicaServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def until(check: Callable[[], object], what: str) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def request(rid: str) -> replica_pb2.GenerateRequest:
    return replica_pb2.GenerateRequest(
        request_id=rid, prompt="p", sampling=replica_pb2.SamplingParams(max_tokens=4)
    )


def texts(sink: RequestSink) -> Iterator[str]:
    return (d.text for d in sink.take())


async def test_multiplexing_order_and_cancellation(replica: tuple[ScriptedReplica, str]) -> None:
    servicer, address = replica
    client = ReplicaClient(MODEL, "r1", address)
    client.start()
    await until(lambda: client.stats.healthy, "the probe")
    assert client.stats.max_in_flight == 8 and client.stats.prefix_cache_hit_rate == 0.25
    old, new = client.submit(request("old"), 16), client.submit(request("new"), 16)
    dup = client.submit(request("old"), 16)  # same id twice on one stream: made unique
    assert dup.request_id.startswith("old~")
    await until(lambda: len(servicer.requests) == 3, "the requests")
    assert servicer.requests == ["old", "new", dup.request_id]
    assert client.stats.in_flight == 3

    servicer.replies.put_nowait(replica_pb2.GenerateReply(deltas=[delta("old", "a")]))
    await until(lambda: old.items, "the first delta")
    list(texts(old))
    # One engine step: a middle token for `old`, the first for `new`, the last for `dup`.
    order: list[str] = []

    def record(rid: str) -> Callable[[object], None]:
        return lambda _: order.append(rid)

    for sink in (old, new, dup):
        sink.arm().add_done_callback(record(sink.request_id))
    servicer.replies.put_nowait(
        replica_pb2.GenerateReply(
            deltas=[delta("old", "b"), delta("new", "x"), delta(dup.request_id, "z", "length")],
            load=replica_pb2.Load(
                running=3,
                waiting=1,
                kv_cache_usage=0.5,
                max_in_flight=8,
                prefix_cache_hit_rate=0.75,
            ),
        )
    )
    await until(lambda: len(order) == 3, "the wakeups")
    assert order == ["new", dup.request_id, "old"]  # first and last outputs first
    assert list(texts(new)) == ["x"] and list(texts(old)) == ["b"]
    assert dup.ended and not new.ended
    assert (client.stats.running, client.stats.waiting, client.stats.kv_cache_usage) == (3, 1, 0.5)
    assert client.stats.prefix_cache_hit_rate == 0.75

    client.release(dup)  # finished: nothing to cancel
    client.release(new)  # still running: cancelled on the replica
    await until(lambda: servicer.cancels == ["new"], "the cancel")
    assert client.stats.in_flight == 1
    client.release(old)
    await client.close()


async def test_overflow_cancels_and_stream_failure_fails_pending(
    replica: tuple[ScriptedReplica, str],
) -> None:
    servicer, address = replica
    client = ReplicaClient(MODEL, "r1", address, failure_threshold=1)
    client.start()
    await until(lambda: client.stats.healthy, "the probe")
    slow = client.submit(request("slow"), 2)
    other = client.submit(request("other"), 16)
    await until(lambda: len(servicer.requests) == 2, "the requests")
    servicer.replies.put_nowait(
        replica_pb2.GenerateReply(deltas=[delta("slow", t) for t in "abc"] + [delta("other", "o")])
    )
    await until(lambda: slow.overflowed, "the overflow")
    assert slow.ended
    await until(lambda: servicer.cancels == ["slow"], "the cancel of the unread request")

    servicer.ready = False
    servicer.replies.put_nowait(None)  # the stream fails (UNAVAILABLE)
    await until(lambda: other.ended, "the failure delta")
    last = other.take()[-1]
    assert last.finish_reason == "error" and last.error.code == UNAVAILABLE
    await until(lambda: not client.stats.healthy, "leaving the rotation")
    servicer.ready = True
    await until(lambda: client.stats.healthy, "the probe bringing it back")
    for sink in (slow, other):
        client.release(sink)
    await client.close()


async def test_a_burst_goes_out_in_few_writes_in_order(
    replica: tuple[ScriptedReplica, str],
) -> None:
    servicer, address = replica
    client = ReplicaClient(MODEL, "r1", address)
    client.start()
    await until(lambda: client.stats.healthy, "the probe")
    sinks = [client.submit(request(f"b{i}"), 16) for i in range(50)]
    client.release(sinks[10])  # a cancel queued behind its request
    await until(lambda: len(servicer.requests) == 50 and servicer.cancels, "the burst")
    assert servicer.requests == [f"b{i}" for i in range(50)]
    assert servicer.cancels == ["b10"]
    assert servicer.batches >= 1, "requests queued behind a write were not batched"
    for sink in sinks:
        if sink is not sinks[10]:
            client.release(sink)
    await client.close()


async def test_writes_wait_for_the_replica_to_apply_the_ones_before(
    replica: tuple[ScriptedReplica, str],
) -> None:
    """Once a replica reports what it applied, at most UNAPPLIED_LIMIT messages are ahead
    of it; what queues meanwhile goes out as one message when it catches up."""
    servicer, address = replica
    client = ReplicaClient(MODEL, "r1", address)
    client.start()
    await until(lambda: client.stats.healthy, "the probe")
    sinks = [client.submit(request("a"), 16)]
    await until(lambda: servicer.requests == ["a"], "the first request")
    servicer.replies.put_nowait(replica_pb2.GenerateReply(applied=1))
    stream = client._streams[0]
    await until(lambda: stream.acking, "the acknowledgement")
    window = [f"w{i}" for i in range(UNAPPLIED_LIMIT)]  # up to the limit not applied
    for count, rid in enumerate(window, start=2):
        sinks.append(client.submit(request(rid), 16))
        await until(partial(lambda n: len(servicer.requests) == n, count), f"request {rid}")
    assert not stream.idle
    sinks += [client.submit(request(rid), 16) for rid in ("d", "e")]
    await asyncio.sleep(0.1)
    assert servicer.requests == ["a", *window], "written past the replica's window"
    batches = servicer.batches
    servicer.replies.put_nowait(replica_pb2.GenerateReply(applied=1 + UNAPPLIED_LIMIT))
    await until(lambda: len(servicer.requests) == 3 + UNAPPLIED_LIMIT, "the held requests")
    assert servicer.requests[-2:] == ["d", "e"] and servicer.batches == batches + 1
    for sink in sinks:
        client.release(sink)
    await client.close()


async def test_a_replica_that_holds_replies_is_told_how_many_were_consumed(
    replica: tuple[ScriptedReplica, str],
) -> None:
    """The count goes back once a reply says the replica holds replies on it: on the next
    request's message, or alone when none is going out. Alone, it is outside the window
    of messages not applied (the replica does not answer it). Only replies saying so
    count."""
    servicer, address = replica
    client = ReplicaClient(MODEL, "r1", address)
    client.start()
    await until(lambda: client.stats.healthy, "the probe")
    sink = client.submit(request("a"), 16)
    await until(lambda: servicer.requests == ["a"], "the request")
    stream = client._streams[0]
    servicer.replies.put_nowait(replica_pb2.GenerateReply(deltas=[delta("a", "x")], applied=1))
    await until(lambda: sink.items, "the first reply")
    await asyncio.sleep(0.05)
    assert servicer.messages == [("request", 0)], "a count went to a replica that holds nothing"
    assert stream.consumed == 0, "a reply the replica does not count was counted"
    servicer.replies.put_nowait(replica_pb2.GenerateReply(deltas=[delta("a", "y")], unread_limit=2))
    await until(lambda: len(servicer.messages) == 2, "the count")
    assert servicer.messages[1] == (None, 1)
    other = client.submit(request("b"), 16)
    await until(lambda: servicer.requests == ["a", "b"], "the next request")
    assert servicer.messages[2] == ("request", 1) and stream.written == 2
    servicer.replies.put_nowait(replica_pb2.GenerateReply(applied=2))  # not counted
    servicer.replies.put_nowait(replica_pb2.GenerateReply(deltas=[delta("a", "z")], unread_limit=2))
    await until(lambda: len(servicer.messages) == 4, "the next count")
    assert servicer.messages[3] == (None, 2) and stream.written == 2
    assert list(texts(sink)) == ["x", "y", "z"]
    client.release(sink)
    client.release(other)
    await client.close()


async def test_first_tokens_of_a_reply_do_not_wait_for_the_writes_of_the_one_before(
    replica: tuple[ScriptedReplica, str],
) -> None:
    """The reader hands out the next reply while the flusher still writes the tokens of
    the one before, slice by slice: a new request's first token does not wait for them."""
    servicer, address = replica
    client = ReplicaClient(MODEL, "r1", address)
    client.start()
    await until(lambda: client.stats.healthy, "the probe")
    running = [client.submit(request(f"r{i}"), 16) for i in range(40)]
    await until(lambda: len(servicer.requests) == 40, "the requests")
    servicer.replies.put_nowait(
        replica_pb2.GenerateReply(deltas=[delta(f"r{i}", "a") for i in range(40)])
    )
    await until(lambda: all(sink.items for sink in running), "their first tokens")
    written: list[str] = []

    def slow_client(deltas: list[replica_pb2.RequestDelta]) -> bool:
        time.sleep(0.005)  # each write holds the loop, as a busy one does
        written.append(deltas[0].request_id)
        return True

    for sink in running:  # each handler streams: waiting, with its tokens written for it
        sink.take()
        sink.direct = slow_client
        sink.arm()
    fresh = client.submit(request("new"), 16)
    await until(lambda: servicer.requests[-1] == "new", "the new request")
    servicer.replies.put_nowait(
        replica_pb2.GenerateReply(deltas=[delta(f"r{i}", "b") for i in range(40)])
    )
    servicer.replies.put_nowait(replica_pb2.GenerateReply(deltas=[delta("new", "x")]))
    await until(lambda: fresh.items, "the new request's first token")
    assert len(written) < 20, "the first token waited for the writes of the reply before"
    await until(lambda: len(written) == 40, "the writes")
    assert written == [f"r{i}" for i in range(40)]
    for sink in [*running, fresh]:
        client.release(sink)
    await client.close()


async def test_a_request_of_n_choices_ends_with_its_last_choice(
    replica: tuple[ScriptedReplica, str],
) -> None:
    servicer, address = replica
    client = ReplicaClient(MODEL, "r1", address)
    client.start()
    await until(lambda: client.stats.healthy, "the probe")
    assert client.max_model_len == 2048  # from Health
    req = request("two")
    req.sampling.n = 2
    sink = client.submit(req, 16)
    await until(lambda: servicer.requests == ["two"], "the request")

    def choice(index: int, text: str, finish: str = "") -> replica_pb2.RequestDelta:
        d = delta("two", text, finish)
        d.index = index
        return d

    servicer.replies.put_nowait(
        replica_pb2.GenerateReply(deltas=[choice(0, "a", "stop"), choice(1, "b")])
    )
    await until(lambda: len(sink.items) == 2, "both deltas")
    assert not sink.ended  # choice 1 still runs: its deltas keep coming
    servicer.replies.put_nowait(replica_pb2.GenerateReply(deltas=[choice(1, "c", "length")]))
    await until(lambda: sink.ended, "the last choice's finish")
    assert [(d.index, d.text) for d in sink.take()] == [(0, "a"), (1, "b"), (1, "c")]
    client.release(sink)
    assert servicer.cancels == []  # finished: nothing to cancel
    await client.close()


async def test_tokenize_and_detokenize_calls(
    replica: tuple[ScriptedReplica, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, address = replica
    client = ReplicaClient(MODEL, "r1", address)
    resp = await client.tokenize(replica_pb2.TokenizeRequest(prompt="ab cde"))
    assert list(resp.tokens) == [2, 3] and resp.max_model_len == 2048
    text = await client.detokenize(replica_pb2.DetokenizeRequest(tokens=[1, 2]))
    assert text.prompt == "x xx"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.detokenize(replica_pb2.DetokenizeRequest(tokens=[101]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    monkeypatch.setattr("gateway.replica_client.TOKENIZE_TIMEOUT_S", 0.2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.tokenize(replica_pb2.TokenizeRequest(prompt="slow"))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await client.close()


async def test_several_deltas_of_one_request_in_one_reply_keep_their_order(
    replica: tuple[ScriptedReplica, str],
) -> None:
    servicer, address = replica
    client = ReplicaClient(MODEL, "r1", address)
    client.start()
    await until(lambda: client.stats.healthy, "the probe")
    sink = client.submit(request("coalesced"), 16)
    await until(lambda: servicer.requests == ["coalesced"], "the request")
    steps = [delta("coalesced", t) for t in ("a", "b", "c")] + [delta("coalesced", "d", "stop")]
    servicer.replies.put_nowait(replica_pb2.GenerateReply(deltas=steps[:2]))  # fresh: a first
    await until(lambda: len(sink.items) == 2, "the first two")
    servicer.replies.put_nowait(replica_pb2.GenerateReply(deltas=steps[2:]))  # the finish last
    await until(lambda: sink.ended, "the finish")
    assert "".join(texts(sink)) == "abcd"
    client.release(sink)
    assert servicer.cancels == []
    await client.close()


async def test_a_replys_token_writes_let_the_loop_run_in_between(
    replica: tuple[ScriptedReplica, str],
) -> None:
    """Tokens written by the reader (`direct`) go out in slices of `WRITE_SLICE_S`: other
    tasks run between two slices (new requests are not held behind the whole reply),
    and the writes keep the reply's order."""
    servicer, address = replica
    client = ReplicaClient(MODEL, "r1", address)
    client.start()
    await until(lambda: client.stats.healthy, "the probe")
    rids = [f"s{i}" for i in range(12)]
    sinks = [client.submit(request(rid), 16) for rid in rids]
    await until(lambda: servicer.requests == rids, "the requests")
    servicer.replies.put_nowait(replica_pb2.GenerateReply(deltas=[delta(r, "a") for r in rids]))
    await until(lambda: all(sink.items for sink in sinks), "the first tokens")
    ticks = 0
    written: list[tuple[str, int]] = []

    def writer(rid: str, deltas: list[replica_pb2.RequestDelta]) -> bool:
        written.append((rid, ticks))
        time.sleep(WRITE_SLICE_S)  # a slow write: each one fills a slice
        return True

    for rid, sink in zip(rids, sinks, strict=True):
        sink.take()
        sink.direct = partial(writer, rid)
        sink.arm()  # the handler waits: the reader writes its tokens

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        servicer.replies.put_nowait(replica_pb2.GenerateReply(deltas=[delta(r, "b") for r in rids]))
        await until(lambda: len(written) == len(rids), "the writes")
    finally:
        task.cancel()
    assert [rid for rid, _ in written] == rids
    seen = [tick for _, tick in written]
    assert seen == sorted(seen) and seen[-1] > seen[0]  # the ticker ran between slices
    for sink in sinks:
        client.release(sink)
    await client.close()
