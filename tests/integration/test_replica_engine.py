"""The replica with the real vLLM engine and the bundled model, over real gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from protos import replica_pb2
from tests.support import Proc, StreamClient, chat

pytestmark = pytest.mark.engine

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def wait_idle(client: StreamClient, timeout: float = 10) -> replica_pb2.HealthResponse:
    """Health once the replica and its engine hold no request."""
    async with asyncio.timeout(timeout):
        while True:
            reply = await client.health()
            if reply.load.in_flight == 0 and reply.load.running == 0 and reply.load.waiting == 0:
                return reply
            await asyncio.sleep(0.1)


def test_health_not_ready_while_loading_then_ready(real_replica: Proc) -> None:
    seen = real_replica.extra["health_while_loading"]
    assert seen == [False], f"first Health answers while loading: {seen}"
    from tests.support import health

    reply = health(real_replica.address)
    assert reply.ready and reply.model == "smollm2" and reply.max_model_len == 2048


async def test_capital_of_france_at_temperature_zero(real_replica: Proc) -> None:
    client = StreamClient(real_replica.address)
    try:
        result = await client.run(
            chat("paris", "What is the capital of France?", max_tokens=24, temperature=0)
        )
    finally:
        await client.close()
    assert "Paris" in result.text, result.text
    assert result.finish_reason in ("stop", "length")
    assert result.prompt_tokens > 10 and 0 < result.completion_tokens <= 24
    assert result.deltas > 1, "tokens must stream, not arrive at once"


async def test_eight_concurrent_streams_share_one_connection(real_replica: Proc) -> None:
    client = StreamClient(real_replica.address)
    try:
        requests = [
            replica_pb2.GenerateRequest(
                request_id=f"c{i}", prompt=f"Story number {i}:", max_tokens=16 + i, temperature=0.8
            )
            for i in range(8)
        ]
        results = await asyncio.gather(*(client.run(r) for r in requests))
    finally:
        await client.close()
    for i, result in enumerate(results):
        assert result.error_code == 0, result.error_message
        assert result.finish_reason in ("length", "stop")
        if result.finish_reason == "length":
            assert result.completion_tokens == 16 + i
        assert result.tokens == result.completion_tokens
    # Deltas of different requests travel together: far fewer replies than tokens.
    assert client.replies < sum(r.tokens for r in results) / 2


async def test_cancel_mid_stream_aborts_engine_request(real_replica: Proc) -> None:
    client = StreamClient(real_replica.address)
    try:
        queue = client.send(
            replica_pb2.GenerateRequest(request_id="long", prompt="Count:", max_tokens=1500)
        )
        for _ in range(3):
            delta = await asyncio.wait_for(queue.get(), 60)
            assert not delta.finish_reason
        busy = await client.health()
        assert busy.load.in_flight == 1
        client.cancel("long")
        idle = await wait_idle(client)
        assert idle.ready
        result = await client.run(chat("after", "Say hello.", max_tokens=8, temperature=0))
        assert result.finish_reason in ("stop", "length") and result.text
    finally:
        await client.close()


async def test_closing_the_stream_aborts_its_requests(real_replica: Proc) -> None:
    client = StreamClient(real_replica.address)
    queue = client.send(
        replica_pb2.GenerateRequest(request_id="gone", prompt="Hi", max_tokens=1500)
    )
    await asyncio.wait_for(queue.get(), 60)
    client.call.cancel()
    await client.channel.close()
    checker = StreamClient(real_replica.address)
    try:
        await wait_idle(checker)
    finally:
        await checker.close()


@pytest.mark.parametrize(
    ("request_fields", "field_name"),
    [
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": -5}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": 5000}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": 8, "temperature": -1.0}, "temperature"),
        ({"prompt": "Hi", "max_tokens": 8, "top_p": 0.0}, "top_p"),
        ({"prompt": "", "max_tokens": 8}, "prompt"),
        ({"prompt": "word " * 3000, "max_tokens": 8}, "prompt"),
        ({"max_tokens": 8}, "prompt"),
    ],
)
async def test_invalid_parameters_are_refused(
    real_replica: Proc, request_fields: dict[str, object], field_name: str
) -> None:
    client = StreamClient(real_replica.address)
    try:
        request = replica_pb2.GenerateRequest(request_id="bad", **request_fields)  # type: ignore[arg-type]
        result = await client.run(request, timeout=30)
    finally:
        await client.close()
    assert result.finish_reason == "error"
    assert result.error_code == INVALID, result
    assert result.error_message.startswith(field_name), result.error_message
