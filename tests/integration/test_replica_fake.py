"""Replica admission, multiplexing and shutdown, with the fake engine."""

from __future__ import annotations

import asyncio
import json
import signal

import grpc
import pytest

from protos import replica_pb2, replica_pb2_grpc
from tests.support import Proc, StreamClient, completion, member_channel, start_replica

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def req(rid: str, max_tokens: int = 10, **sampling: object) -> replica_pb2.GenerateRequest:
    return completion(rid, "a b c", max_tokens=max_tokens, **sampling)


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
        # As vLLM: the stop string ends the text and is not part of it, unless asked.
        assert stopped.finish_reason == "stop" and stopped.stop_reasons == {0: "fox"}
        assert "fox" not in stopped.text and stopped.text.endswith("brown ")
        kept = await client.run(req("k", 50, stop=["fox"], include_stop_str_in_output=True))
        assert kept.text == stopped.text + "fox"
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
            request = completion(f"rid-{len(flag)}", f"tell me {secret}", max_tokens=2)
            assert (await client.run(request)).finish_reason == "length"
        finally:
            await client.close()
            proc.stop()
        log = proc.log()
        assert (secret in log) is expected, log
        if expected:
            line = next(x for x in log.splitlines() if secret in x)
            assert "[rid-1]" in line


# ----- the full sampling contract, with the fake engine ---------------------------------------


def tokenize_stub(address: str) -> replica_pb2_grpc.ReplicaStub:
    return replica_pb2_grpc.ReplicaStub(member_channel(address))


async def test_n_choices_are_distinct_with_totals_on_the_last_delta(fake_replica: Proc) -> None:
    client = StreamClient(fake_replica.address)
    try:
        one = await client.run(req("one", 4))
        three = await client.run(req("three", 4, n=3))
    finally:
        await client.close()
    assert three.texts[0] == one.text == "over a lazy dog"
    assert three.texts[1] == "over1 a1 lazy1 dog1"
    assert three.texts[2] == "over2 a2 lazy2 dog2"
    assert three.finish_reasons == {0: "length", 1: "length", 2: "length"}
    # Per choice per step, each with its index; totals once, on the request's last delta.
    assert sorted(d.index for d in three.all_deltas) == [0] * 4 + [1] * 4 + [2] * 4
    with_totals = [d for d in three.all_deltas if d.completion_tokens]
    assert with_totals == [three.all_deltas[-1]]
    assert (three.prompt_tokens, three.completion_tokens) == (3, 12)
    first = three.all_deltas[0]
    assert first.index == 0 and list(first.prompt_token_ids) == three.prompt_token_ids
    assert len(three.prompt_token_ids) == 3
    assert not any(d.prompt_token_ids for d in three.all_deltas[1:])
    assert all(d.num_tokens == len(d.token_ids) == 1 for d in three.all_deltas)


async def test_seed_token_ids_and_detokenize_agree(fake_replica: Proc) -> None:
    client = StreamClient(fake_replica.address)
    stub = tokenize_stub(fake_replica.address)
    try:
        plain = await client.run(req("p", 5))
        seeded = await client.run(req("s", 5, seed=3))
        again = await client.run(req("s2", 5, seed=3))
        text = await stub.Detokenize(replica_pb2.DetokenizeRequest(tokens=seeded.token_ids[0]))
    finally:
        await client.close()
    assert seeded.text == again.text != plain.text
    assert text.prompt == seeded.text


async def test_stop_token_ids_and_min_tokens(fake_replica: Proc) -> None:
    client = StreamClient(fake_replica.address)
    try:
        plain = await client.run(req("p", 6))
        stop_id = plain.token_ids[0][2]
        stopped = await client.run(req("s", 6, stop_token_ids=[stop_id]))
        # A stop string is not looked for until min_tokens are out.
        early = plain.text.split()[0]
        later = await client.run(req("m", 6, stop=[early], min_tokens=3))
    finally:
        await client.close()
    # As vLLM: the stop token counts and is in token_ids, its text is not in the text.
    assert stopped.token_ids[0] == plain.token_ids[0][:3]
    assert stopped.text == " ".join(plain.text.split()[:2])
    assert (stopped.finish_reason, stopped.stop_reasons[0]) == ("stop", str(stop_id))
    assert later.finish_reason == "length" and later.text == plain.text


async def test_logprobs_and_prompt_logprobs_have_the_asked_shape(fake_replica: Proc) -> None:
    client = StreamClient(fake_replica.address)
    try:
        result = await client.run(req("lp", 3, n=2, logprobs=3, prompt_logprobs=1))
        none = await client.run(req("none", 3))
    finally:
        await client.close()
    for index in (0, 1):
        entries = result.logprobs[index]
        assert [e.token_id for e in entries] == result.token_ids[index]
        assert "".join(e.token for e in entries) == result.texts[index]
        for entry in entries:
            assert entry.has_logprob and entry.logprob < 0
            assert len(entry.top) == 3 and entry.top[0].token_id == entry.token_id
            assert [t.logprob for t in entry.top] == sorted(
                (t.logprob for t in entry.top), reverse=True
            )
    prompt = result.prompt_logprobs
    assert [p.token_id for p in prompt] == result.prompt_token_ids
    assert not prompt[0].has_logprob and all(p.has_logprob and len(p.top) == 1 for p in prompt[1:])
    assert not none.logprobs[0] and not none.prompt_logprobs


async def test_structured_outputs_answer_minimally_or_are_refused(fake_replica: Proc) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }

    def structured(rid: str, **kind: object) -> replica_pb2.GenerateRequest:
        return req(rid, 40, structured=replica_pb2.StructuredOutput(**kind))  # type: ignore[arg-type]

    client = StreamClient(fake_replica.address)
    try:
        as_json = await client.run(structured("j", json_schema=json.dumps(schema)))
        as_object = await client.run(structured("o", json_object=True))
        as_choice = await client.run(
            structured("c", choice=replica_pb2.ChoiceList(choices=["yes", "no"]))
        )
        as_regex = await client.run(structured("r", regex="[a-z]+"))
        short = await client.run(req("t", 2, structured={"json_schema": json.dumps(schema)}))
    finally:
        await client.close()
    assert json.loads(as_json.text) == {"name": "a", "age": 0}
    assert as_json.finish_reason == "stop" and as_json.deltas > 1
    assert (as_object.text, as_choice.text) == ("{}", "yes")
    assert as_regex.error_code == INVALID
    assert as_regex.error_message.startswith("structured_outputs: the fake engine cannot")
    assert short.finish_reason == "length" and short.completion_tokens == 2


async def test_tokenize_renders_as_generate_does(fake_replica: Proc) -> None:
    stub = tokenize_stub(fake_replica.address)
    client = StreamClient(fake_replica.address)
    messages = [replica_pb2.ChatMessage(role="user", content="the quick fox")]
    try:
        tokens = await stub.Tokenize(
            replica_pb2.TokenizeRequest(messages=messages, return_token_strs=True)
        )
        generated = await client.run(
            replica_pb2.GenerateRequest(
                request_id="g", messages=messages, sampling=replica_pb2.SamplingParams(max_tokens=1)
            )
        )
        words = await stub.Tokenize(replica_pb2.TokenizeRequest(prompt="the fox2 lazy"))
        back = await stub.Detokenize(replica_pb2.DetokenizeRequest(tokens=words.tokens))
        with pytest.raises(grpc.aio.AioRpcError) as bad_id:
            await stub.Detokenize(replica_pb2.DetokenizeRequest(tokens=[1, 10**9]))
        with pytest.raises(grpc.aio.AioRpcError) as bad_input:
            await stub.Tokenize(replica_pb2.TokenizeRequest(prompt="x", messages=messages))
    finally:
        await client.close()
    assert list(tokens.tokens) == generated.prompt_token_ids
    # "user:" is not a fake vocabulary word: its hashed id spells another word.
    assert len(tokens.token_strs) == 4 and list(tokens.token_strs)[1:] == ["the", "quick", "fox"]
    assert tokens.max_model_len == 2048
    assert list(words.tokens) == [0, 45, 7] and back.prompt == "the fox2 lazy"
    assert bad_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_id.value.details().startswith("tokens:")
    assert bad_input.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancelling_an_n_choice_request_frees_every_choice(fake_replica: Proc) -> None:
    client = StreamClient(fake_replica.address)
    try:
        queue = client.send(req("many", 100_000 // 100, n=4))
        seen: set[int] = set()
        while len(seen) < 4:
            seen.add((await asyncio.wait_for(queue.get(), 5)).index)
        assert (await client.health()).load.running == 1
        client.cancel("many")
        async with asyncio.timeout(5):
            while True:
                health = await client.health()
                if not (health.load.in_flight or health.load.running):
                    break
                await asyncio.sleep(0.02)
        after = await client.run(req("after", 2))
        assert after.finish_reason == "length"
    finally:
        await client.close()
