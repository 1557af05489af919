"""The replica's Generate servicer in-process, over the fake engine (no network).

What the servicer promises around tokenization moving off the event loop:
other streams go on while a prompt is tokenized, a cancel right behind its
request still cancels it, and refusals after tokenization give back their slot.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import REGISTRY

from protos import replica_pb2
from replica.server import UNREAD_LIMIT, ReplicaService
from tests.support import LONG, RecordingEngine, completion

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
Message = replica_pb2.GenerateClientMessage


class Client:
    """One Generate stream on the servicer itself; deltas collected by request id."""

    def __init__(self, service: ReplicaService) -> None:
        self.outgoing: asyncio.Queue[Message | None] = asyncio.Queue()
        self.deltas: dict[str, list[replica_pb2.RequestDelta]] = defaultdict(list)
        self.applied: list[int] = []
        """Each reply's count of applied messages, in order."""
        self.replies: list[replica_pb2.GenerateReply] = []
        self.changed = asyncio.Event()
        replies = service.Generate(self._messages(), None)  # type: ignore[arg-type]
        self.reader = asyncio.create_task(self._read(replies))

    async def _messages(self) -> AsyncIterator[Message]:
        while (message := await self.outgoing.get()) is not None:
            yield message

    async def _read(self, replies: AsyncIterator[replica_pb2.GenerateReply]) -> None:
        async for reply in replies:
            self.applied.append(reply.applied)
            self.replies.append(reply)
            for delta in reply.deltas:
                self.deltas[delta.request_id].append(delta)
            self.changed.set()

    def send(self, *messages: Message) -> None:
        if len(messages) == 1:
            self.outgoing.put_nowait(messages[0])
        else:
            self.outgoing.put_nowait(Message(batch=replica_pb2.RequestBatch(messages=messages)))

    async def finished(self, rid: str, timeout: float = 5.0) -> replica_pb2.RequestDelta:
        async with asyncio.timeout(timeout):
            while not (self.deltas[rid] and self.deltas[rid][-1].finish_reason):
                self.changed.clear()
                await self.changed.wait()
        return self.deltas[rid][-1]

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        await asyncio.wait_for(self.reader, 5)


def generate(rid: str, prompt: str, max_tokens: int = 5) -> Message:
    return Message(request=completion(rid, prompt, max_tokens=max_tokens))


def outcomes(model: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "mss_replica_requests_total", {"model": model, "outcome": outcome}
    )
    return value or 0.0


async def serving(
    token_interval_ms: float = 5.0, paced_deltas_per_s: float = 0.0
) -> tuple[ReplicaService, RecordingEngine]:
    """A ready service on the fake engine; every reply of tokens is counted toward the
    hold unless `paced_deltas_per_s` says from which rate on."""
    engine = RecordingEngine(token_interval_ms)
    await engine.start()
    service = ReplicaService(engine, "r1", max_in_flight=8, paced_deltas_per_s=paced_deltas_per_s)
    service.ready = True
    return service, engine


async def test_streams_go_on_while_a_prompt_is_tokenized() -> None:
    service, engine = await serving()
    client = Client(service)
    try:
        client.send(generate("fast", "a b c", max_tokens=5))
        await asyncio.wait_for(client.changed.wait(), 5)  # fast is streaming
        client.send(generate("slow", "slow prompt to tokenize" + LONG))  # 0.2 s on the thread
        fast = await client.finished("fast")
        assert fast.finish_reason == "length"
        assert not client.deltas["slow"], "fast finished while slow was still being tokenized"
        assert (await client.finished("slow")).finish_reason == "length"
    finally:
        await client.close()
        await engine.shutdown()


async def test_each_applied_message_is_acknowledged_before_any_token() -> None:
    """A reply goes out once a message is applied, deltas or not, counting the messages
    (a batch once): the gateway holds its next message until then."""
    service, engine = await serving(token_interval_ms=60_000)  # no token comes
    client = Client(service)
    try:
        client.send(generate("a", "a b"), generate("b", "c d"))  # one batch: one message

        async def acknowledged(count: int) -> None:
            async with asyncio.timeout(5):
                while count not in client.applied:
                    client.changed.clear()
                    await client.changed.wait()

        await acknowledged(1)
        client.send(Message(cancel=replica_pb2.CancelRequest(request_id="a")))
        await acknowledged(2)
        assert client.applied == sorted(client.applied) and not client.deltas["b"]
        client.send(Message(cancel=replica_pb2.CancelRequest(request_id="b")))
        await asyncio.wait_for(service.idle.wait(), 5)
    finally:
        await client.close()
        await engine.shutdown()


def counted(client: Client) -> int:
    """Replies the replica counts toward its limit (replies of tokens)."""
    return sum(1 for r in client.replies if r.unread_limit)


async def test_replies_wait_for_the_gateway_to_consume_them() -> None:
    """Once the gateway reports what it consumed, at most UNREAD_LIMIT replies of tokens are
    ahead of it: the steps the engine produces meanwhile come together in the next reply.
    A message carrying only the count is not applied (no reply answers it)."""
    service, engine = await serving(token_interval_ms=20)
    client = Client(service)
    try:
        client.send(generate("a", "a b", max_tokens=40))
        async with asyncio.timeout(5):
            while not counted(client):
                client.changed.clear()
                await client.changed.wait()
        assert all(r.unread_limit == UNREAD_LIMIT for r in client.replies if r.deltas)
        client.send(Message(consumed=1))
        await asyncio.sleep(0.2)  # 10 engine steps: the replies allowed go out
        held = len(client.replies)
        await asyncio.sleep(0.2)  # 10 more
        assert len(client.replies) == held, "replies went out that the gateway had not consumed"
        assert counted(client) <= 2 + UNREAD_LIMIT  # what went out before the count came
        assert len(client.deltas["a"]) < 10
        client.send(Message(consumed=counted(client)))
        async with asyncio.timeout(5):
            while len(client.replies) == held:
                client.changed.clear()
                await client.changed.wait()
        caught_up = [d for d in client.replies[held].deltas if d.request_id == "a"]
        assert len(caught_up) >= 5, "the steps produced meanwhile did not come as one reply"
        assert set(client.applied) == {1}, "the count of consumed replies was applied"
        # A gateway that stops sending (its side closed) can report nothing more:
        # the rest is not held.
        await client.close()
        assert (await client.finished("a")).finish_reason == "length"
        assert len(client.deltas["a"]) == 40  # the last token comes with the finish
    finally:
        await client.close()
        await engine.shutdown()


async def test_only_replies_that_come_fast_are_counted() -> None:
    """Replies of tokens slower than the paced rate are not counted, so the gateway sends
    no count back for them (a real engine on a CPU); once they come faster, they are."""
    service, engine = await serving(token_interval_ms=2, paced_deltas_per_s=1_500)
    client = Client(service)

    def share_counted(rids: set[str]) -> float:
        replies = [r for r in client.replies if {d.request_id for d in r.deltas} & rids]
        return sum(1 for r in replies if r.unread_limit) / len(replies)

    try:
        client.send(generate("slow", "a b", max_tokens=100))  # 500 deltas a second
        await client.finished("slow")
        fast = {f"fast{i}" for i in range(8)}  # 4,000 deltas a second
        client.send(*(generate(rid, "a b", max_tokens=100) for rid in sorted(fast)))
        for rid in fast:
            await client.finished(rid)
        # A stalled loop's clock catches up with steps back to back, which may count
        # a slow reply or leave a fast one out now and then.
        assert share_counted({"slow"}) < 0.25
        assert share_counted(fast) > 0.75
    finally:
        await client.close()
        await engine.shutdown()


async def test_first_deltas_and_counts_do_not_wait_behind_held_replies() -> None:
    """While replies of tokens are held, a new request's first delta (or its refusal) and
    the count of applied messages go out ahead, in replies that are not counted; the
    request's next deltas come after its first, with the held steps."""
    service, engine = await serving(token_interval_ms=20)
    client = Client(service)

    async def arrived(rid: str, count: int = 1) -> None:
        async with asyncio.timeout(5):
            while len(client.deltas[rid]) < count:
                client.changed.clear()
                await client.changed.wait()

    try:
        client.send(generate("a", "a b", max_tokens=60))
        await arrived("a")
        client.send(Message(consumed=1))
        await asyncio.sleep(0.2)  # the replies allowed go out, then the rest is held
        client.send(Message(consumed=counted(client) - UNREAD_LIMIT))
        await asyncio.sleep(0.1)
        held = len(client.replies)  # exactly UNREAD_LIMIT not consumed
        held_counted = counted(client)
        client.send(generate("b", "c d", max_tokens=60))
        await arrived("b")
        client.send(generate("", "e f"))  # refused: its error is a first delta too
        await arrived("")
        ahead = client.replies[held:]
        assert counted(client) == held_counted, "a reply of tokens went out while held"
        assert [d.request_id for r in ahead for d in r.deltas] == ["b", ""]
        assert client.deltas[""][0].error.code == INVALID
        assert ahead[-1].applied == 3, "the count of applied messages was held"
        assert not client.deltas["a"][-1].finish_reason
        client.send(Message(consumed=held_counted))
        await arrived("b", 2)
        after = client.replies[held + len(ahead) :]
        assert after[0].unread_limit and len(after[0].deltas) >= 5, "the held steps"
        assert all(r.unread_limit for r in after if any(d.request_id == "b" for d in r.deltas))
    finally:
        await client.close()
        await engine.shutdown()


async def test_a_cancel_in_the_same_batch_as_its_request_gives_back_the_slot() -> None:
    service, engine = await serving()
    aborted_before = outcomes("echo", "abort")
    client = Client(service)
    try:
        cancel = Message(cancel=replica_pb2.CancelRequest(request_id="gone"))
        client.send(generate("gone", "a b c", max_tokens=50), cancel)
        client.send(generate("next", "a b"))  # applied after the batch
        assert (await client.finished("next")).finish_reason == "length"
        assert not client.deltas["gone"]
        assert engine.tokenized == ["a b"]  # "gone" was cancelled before it ran at all
        assert outcomes("echo", "abort") == aborted_before + 1
        # The last delta goes out as the engine produces it; the slot comes back once the
        # request's task has unwound, a loop turn or two later.
        await asyncio.wait_for(service.idle.wait(), 1)
        assert service.in_flight == 0
    finally:
        await client.close()
        await engine.shutdown()


async def test_a_cancel_during_tokenization_never_reaches_the_engine() -> None:
    service, engine = await serving()
    aborted_before = outcomes("echo", "abort")
    client = Client(service)
    try:
        client.send(generate("gone", "slow prompt" + LONG, max_tokens=50))
        assert await asyncio.to_thread(engine.tokenizing.wait, 5)
        client.send(Message(cancel=replica_pb2.CancelRequest(request_id="gone")))
        # Tokenized after "gone" (one tokenizer thread), so it ends well after the cancel.
        client.send(generate("next", "a b"))
        assert (await client.finished("next")).finish_reason == "length"
        assert not client.deltas["gone"]
        assert engine.tokenized == ["slow prompt" + LONG, "a b"]
        assert engine.aborted == []  # nothing was in the engine to abort
        assert outcomes("echo", "abort") == aborted_before + 1
        # The last delta goes out as the engine produces it; the slot comes back once the
        # request's task has unwound, a loop turn or two later.
        await asyncio.wait_for(service.idle.wait(), 1)
        assert service.in_flight == 0
    finally:
        await client.close()
        await engine.shutdown()


async def test_a_refusal_after_tokenizing_gives_back_its_slot() -> None:
    service, engine = await serving()
    refused_before = outcomes("echo", "rejected_invalid_argument")
    errors_before = outcomes("echo", "error")
    client = Client(service)
    try:
        client.send(generate("long", "word " * 3000))
        last = await client.finished("long")
        assert last.finish_reason == "error" and last.error.code == INVALID
        assert last.error.message.startswith("prompt:")
        assert service.in_flight == 0
        assert outcomes("echo", "rejected_invalid_argument") == refused_before + 1
        assert outcomes("echo", "error") == errors_before
    finally:
        await client.close()
        await engine.shutdown()


class Aborted(Exception):
    """What `FakeContext.abort` raises, as gRPC's context does, with the status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class FakeContext:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


async def test_tokenize_and_detokenize_answer_once_loaded() -> None:
    service, engine = await serving()
    context = FakeContext()
    try:
        tokens = await service.Tokenize(
            replica_pb2.TokenizeRequest(prompt="the quick fox"),
            context,  # type: ignore[arg-type]
        )
        assert list(tokens.tokens) == [0, 1, 3] and tokens.max_model_len == 2048
        text = await service.Detokenize(
            replica_pb2.DetokenizeRequest(tokens=tokens.tokens),
            context,  # type: ignore[arg-type]
        )
        assert text.prompt == "the quick fox"
        with pytest.raises(Aborted) as refused:
            await service.Detokenize(
                replica_pb2.DetokenizeRequest(tokens=[-1]),
                context,  # type: ignore[arg-type]
            )
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert str(refused.value).startswith("tokens:")
        service.ready = False
        with pytest.raises(Aborted) as loading:
            await service.Tokenize(
                replica_pb2.TokenizeRequest(prompt="x"),
                context,  # type: ignore[arg-type]
            )
        assert loading.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await engine.shutdown()


def metric(name: str, model: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model": model})


async def test_prefix_cache_numbers_reach_the_load_and_metrics_as_the_engine_has_them() -> None:
    service, engine = await serving()
    try:
        model = engine.model_name
        assert metric("mss_replica_prefix_cache_queries_total", model) == 0
        assert metric("mss_replica_prefix_cache_hits_total", model) == 0
        assert metric("mss_replica_prefix_cache_hit_rate", model) == 0
        # What vLLM's engine would have added up; the fake engine has no prefix cache.
        engine.load.prefix_cache_queries = 1200
        engine.load.prefix_cache_hits = 512
        engine.load.prefix_cache_hit_rate = 0.25
        load = service.load_pb()
        assert (load.prefix_cache_queries, load.prefix_cache_hits) == (1200, 512)
        assert load.prefix_cache_hit_rate == 0.25
        assert metric("mss_replica_prefix_cache_queries_total", model) == 1200
        assert metric("mss_replica_prefix_cache_hits_total", model) == 512
        assert metric("mss_replica_prefix_cache_hit_rate", model) == 0.25
    finally:
        await engine.shutdown()
