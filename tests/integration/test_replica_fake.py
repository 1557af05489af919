"""Replica admission, multiplexing and shutdown, with the fake engine."""

from __future__ import annotations

import asyncio
import signal

import grpc

from protos import replica_pb2
from tests.support import Proc, StreamClient, start_replica

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def req(rid: str, max_tokens: int = 10, **kw: object) -> replica_pb2.GenerateRequest:
    return replica_pb2.GenerateRequest(request_id=rid, prompt="a b c", max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


async def test_over_limit_is_rejected_at_once() -> None:
    proc = start_replica(engine="fake", token_interval_ms=20, max_in_flight=2)
    client = StreamClient(proc.address)
    try:
        first = [asyncio.create_task(client.run(req(f"ok{i}", 20))) for i in range(2)]
        await asyncio.sleep(0.2)
        rejected = await client.run(req("third"), timeout=2)
        assert rejected.error_code == EXHAUSTED and "limit of 2" in rejected.error_message
        assert all(r.finish_reason == "length" for r in await asyncio.gather(*first))
        again = await client.run(req("later", 3))
        assert again.finish_reason == "length" and again.completion_tokens == 3
    finally:
        await client.close()
        proc.stop()


async def test_stop_string_and_duplicate_ids(fake_replica: Proc) -> None:
    client = StreamClient(fake_replica.address)
    try:
        stopped = await client.run(req("s", 50, stop=["fox"]))
        assert stopped.finish_reason == "stop" and stopped.text.endswith("fox")
        long = asyncio.create_task(client.run(req("dup", 30)))
        await asyncio.sleep(0.05)
        # Both requests share the id, so their deltas share this queue: find the refusal.
        dup_queue = client.send(req("dup", 5))
        errors = []
        for _ in range(30):
            delta = await asyncio.wait_for(dup_queue.get(), 5)
            if delta.error.code:
                errors.append(delta.error)
                break
        assert errors and errors[0].code == INVALID
        assert "already running" in errors[0].message
        long.cancel()
    finally:
        await client.close()


async def test_sigterm_drains_in_flight_then_exits() -> None:
    proc = start_replica(engine="fake", token_interval_ms=20)
    client = StreamClient(proc.address)
    try:
        running = asyncio.create_task(client.run(req("inflight", 40)))
        await asyncio.sleep(0.2)
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        health = await client.health()
        assert health.draining and not health.ready
        refused = await client.run(req("new"), timeout=5)
        assert refused.error_code == UNAVAILABLE and "draining" in refused.error_message
        finished = await running
        assert finished.finish_reason == "length" and finished.completion_tokens == 40
    finally:
        await client.close()
    assert await asyncio.to_thread(proc.proc.wait, 15) == 0
    assert "stopped" in proc.log()


async def test_drain_deadline_cancels_with_explicit_error() -> None:
    proc = start_replica(engine="fake", token_interval_ms=50, extra_args=["--drain-timeout", "0.5"])
    client = StreamClient(proc.address)
    try:
        running = asyncio.create_task(client.run(req("slow", 1000)))
        await asyncio.sleep(0.2)
        proc.proc.send_signal(signal.SIGTERM)
        result = await asyncio.wait_for(running, 10)
        assert result.finish_reason == "error" and result.error_code == UNAVAILABLE
    finally:
        await client.close()
        proc.stop()


async def test_prompts_are_logged_only_when_asked() -> None:
    secret = "zebra-quartz-7741"
    for flag, expected in (([], False), (["--log-prompts"], True)):
        proc = start_replica(engine="fake", token_interval_ms=1, extra_args=flag)
        client = StreamClient(proc.address)
        try:
            request = replica_pb2.GenerateRequest(
                request_id=f"rid-{len(flag)}", prompt=f"tell me {secret}", max_tokens=2
            )
            assert (await client.run(request)).finish_reason == "length"
        finally:
            await client.close()
            proc.stop()
        log = proc.log()
        assert (secret in log) is expected, log
        if expected:
            line = next(x for x in log.splitlines() if secret in x)
            assert "[rid-1]" in line
