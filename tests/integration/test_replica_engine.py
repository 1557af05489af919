"""The replica with the real vLLM engine and the bundled model, over real gRPC."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import replica_pb2, replica_pb2_grpc
from tests.support import Proc, Result, StreamClient, chat, completion, member_channel

pytestmark = pytest.mark.engine

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
BLOCK_TOKENS = 128
"""vLLM's KV-cache block on CPU (the replica logs it); the prefix cache reuses whole blocks."""


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
    # The first chat's rendering (vLLM's renderer compiles the template) is paid before
    # the replica says it is ready, not by the first request.
    log = real_replica.log()
    assert "request path warmed" in log, log[-2000:]
    assert log.index("request path warmed") < log.index("ready: smollm2")


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
            completion(f"c{i}", f"Story number {i}:", max_tokens=16 + i, temperature=0.8)
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
        queue = client.send(completion("long", "Count:", max_tokens=1500))
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
    queue = client.send(completion("gone", "Hi", max_tokens=1500))
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
        ({"prompt": "Hi", "sampling": {"max_tokens": -5}}, "max_tokens"),
        ({"prompt": "Hi", "sampling": {"max_tokens": 5000}}, "max_tokens"),
        ({"prompt": "Hi", "sampling": {"max_tokens": 8, "temperature": -1.0}}, "temperature"),
        ({"prompt": "Hi", "sampling": {"max_tokens": 8, "top_p": 0.0}}, "top_p"),
        ({"prompt": "", "sampling": {"max_tokens": 8}}, "prompt"),
        ({"prompt": "word " * 3000, "sampling": {"max_tokens": 8}}, "prompt"),
        ({"sampling": {"max_tokens": 8}}, "prompt"),
        ({"prompt": "Hi", "sampling": {"logit_bias": {60000: 5.0}}}, "logit_bias"),
        ({"prompt": "Hi", "sampling": {"logprobs": 21}}, "logprobs"),
        ({"prompt": "Hi", "sampling": {"n": 100000}}, "n"),
        ({"prompt_token_ids": [1, 2, 999999], "sampling": {"max_tokens": 4}}, "prompt"),
        (
            {"prompt": "Hi", "sampling": {"structured": {"json_schema": "{not json"}}},
            "response_format",
        ),
        (
            {
                "prompt": "Hi",
                "sampling": {"structured": {"json_schema": '{"type": "object", "required": 3}'}},
            },
            "response_format",
        ),
        (
            {"prompt": "Hi", "sampling": {"structured": {"regex": "(unclosed"}}},
            "structured_outputs",
        ),
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


# ----- the full sampling contract, with the real engine ---------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


async def run_all(
    address: str, *requests: replica_pb2.GenerateRequest, timeout: float = 120
) -> list[Result]:
    client = StreamClient(address)
    try:
        return list(await asyncio.gather(*(client.run(r, timeout) for r in requests)))
    finally:
        await client.close()


async def test_n_choices_greedy_are_identical_and_seeded_sampling_differs(
    real_replica: Proc,
) -> None:
    prompt = "Write a line about the sea."
    # Greedy through top_k=1: vLLM refuses n > 1 at temperature 0 (and so do we).
    greedy, seeded, again, refused = await run_all(
        real_replica.address,
        chat("g", prompt, max_tokens=12, n=2, top_k=1),
        chat("s", prompt, max_tokens=12, n=2, temperature=1.0, seed=11),
        chat("s2", prompt, max_tokens=12, n=2, temperature=1.0, seed=11),
        chat("t0", prompt, max_tokens=12, n=2, temperature=0),
    )
    for result in (greedy, seeded):
        assert result.error_code == 0, result.error_message
        assert set(result.texts) == set(result.finish_reasons) == {0, 1}
        assert result.completion_tokens == sum(len(ids) for ids in result.token_ids.values())
        assert result.prompt_tokens == len(result.prompt_token_ids) > 10
        assert result.all_deltas[-1].completion_tokens == result.completion_tokens
    assert greedy.texts[0] == greedy.texts[1] and greedy.texts[0]
    assert greedy.token_ids[0] == greedy.token_ids[1]
    # vLLM seeds choice i with seed + i: distinct choices, the same ones every time.
    assert seeded.token_ids[0] != seeded.token_ids[1]
    assert seeded.texts == again.texts
    assert refused.error_code == INVALID and refused.error_message.startswith("n:")


async def test_logprobs_with_top_alternatives_and_prompt_logprobs(real_replica: Proc) -> None:
    (result,) = await run_all(
        real_replica.address,
        completion(
            "lp",
            "The capital of France is",
            max_tokens=5,
            temperature=0,
            logprobs=3,
            prompt_logprobs=2,
        ),
    )
    assert result.error_code == 0, result.error_message
    entries = result.logprobs[0]
    assert [e.token_id for e in entries] == result.token_ids[0]
    # Each token as vLLM's server decodes it: together they spell the text.
    assert "".join(e.token for e in entries) == result.text
    for entry in entries:
        assert entry.has_logprob and entry.logprob <= 0
        # Greedy: the chosen token is the most likely, so vLLM's list is exactly 3 long.
        assert len(entry.top) == 3 and entry.top[0].token_id == entry.token_id
        assert entry.top[0].logprob == pytest.approx(entry.logprob)
        assert entry.top[0].logprob >= entry.top[1].logprob >= entry.top[2].logprob
        assert all(t.token for t in entry.top)
    prompt = result.prompt_logprobs
    assert [p.token_id for p in prompt] == result.prompt_token_ids
    assert not prompt[0].has_logprob and prompt[0].token
    assert all(p.has_logprob and 1 <= len(p.top) <= 3 for p in prompt[1:])


async def test_structured_outputs_json_schema_and_choice(real_replica: Proc) -> None:
    as_json, as_choice, as_object = await run_all(
        real_replica.address,
        chat(
            "j",
            "Describe a person and their pet as JSON.",
            max_tokens=80,
            temperature=0,
            structured=replica_pb2.StructuredOutput(json_schema=json.dumps(PERSON)),
        ),
        chat(
            "c",
            "Is the sky green?",
            max_tokens=10,
            temperature=0,
            structured=replica_pb2.StructuredOutput(
                choice=replica_pb2.ChoiceList(choices=["maybe", "definitely not"])
            ),
        ),
        chat(
            "o",
            "Tell me about Paris.",
            max_tokens=60,
            temperature=0,
            structured=replica_pb2.StructuredOutput(json_object=True),
        ),
    )
    person = json.loads(as_json.text)
    assert set(person) == {"name", "age", "pet"}, person
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    assert person["pet"] in ("cat", "dog")
    assert as_json.finish_reason == "stop"
    assert as_choice.text in ("maybe", "definitely not")
    assert as_object.finish_reason == "length" or isinstance(json.loads(as_object.text), dict)


async def test_logit_bias_forces_a_token_and_stop_token_ids_stop(real_replica: Proc) -> None:
    stub = replica_pb2_grpc.ReplicaStub(member_channel(real_replica.address))
    word = await stub.Tokenize(
        replica_pb2.TokenizeRequest(prompt=" banana", add_special_tokens=False)
    )
    banana = word.tokens[0]
    forced, free = await run_all(
        real_replica.address,
        chat("b", "Say hello.", max_tokens=4, temperature=0, logit_bias={banana: 100.0}),
        chat("f", "Count from one to ten in words.", max_tokens=10, temperature=0),
    )
    assert forced.token_ids[0] == [banana] * 4, forced.token_ids
    ids = free.token_ids[0]
    position = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    (stopped,) = await run_all(
        real_replica.address,
        chat(
            "s",
            "Count from one to ten in words.",
            max_tokens=10,
            temperature=0,
            stop_token_ids=[ids[position]],
        ),
    )
    # As vLLM: the stop token is generated and counted, its text left out.
    assert stopped.token_ids[0] == ids[: position + 1]
    assert (stopped.finish_reason, stopped.stop_reasons[0]) == ("stop", str(ids[position]))
    assert free.text.startswith(stopped.text) and len(stopped.text) < len(free.text)


async def test_tokenize_and_detokenize_round_trip(real_replica: Proc) -> None:
    stub = replica_pb2_grpc.ReplicaStub(member_channel(real_replica.address))
    text = "The capital of France is Paris."
    tokens = await stub.Tokenize(
        replica_pb2.TokenizeRequest(prompt=text, add_special_tokens=False, return_token_strs=True)
    )
    back = await stub.Detokenize(replica_pb2.DetokenizeRequest(tokens=tokens.tokens))
    assert back.prompt == text
    assert len(tokens.token_strs) == len(tokens.tokens) > 3
    assert tokens.max_model_len == 2048
    messages = [replica_pb2.ChatMessage(role="user", content="What is the capital of France?")]
    rendered = await stub.Tokenize(replica_pb2.TokenizeRequest(messages=messages))
    (generated,) = await run_all(
        real_replica.address,
        replica_pb2.GenerateRequest(
            request_id="t", messages=messages, sampling=replica_pb2.SamplingParams(max_tokens=1)
        ),
    )
    assert list(rendered.tokens) == generated.prompt_token_ids
    with pytest.raises(grpc.aio.AioRpcError) as bad_options:
        await stub.Tokenize(
            replica_pb2.TokenizeRequest(
                messages=messages,
                chat_template=replica_pb2.ChatTemplateOptions(continue_final_message=True),
            )
        )
    assert bad_options.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_options.value.details().startswith("continue_final_message:")
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.Detokenize(replica_pb2.DetokenizeRequest(tokens=[1, 10**8]))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.details().startswith("tokens:")


async def test_cancelling_an_n_choice_request_frees_the_engine(real_replica: Proc) -> None:
    client = StreamClient(real_replica.address)
    try:
        queue = client.send(chat("many", "Count:", max_tokens=1500, n=2, ignore_eos=True))
        seen: set[int] = set()
        while len(seen) < 2:
            delta = await asyncio.wait_for(queue.get(), 60)
            assert not delta.error.code, delta.error.message
            seen.add(delta.index)
        assert (await client.health()).load.in_flight == 1
        client.cancel("many")
        idle = await wait_idle(client)
        assert idle.ready
        after = await client.run(chat("after", "Say hello.", max_tokens=4, temperature=0))
        assert after.finish_reason in ("stop", "length") and after.text
    finally:
        await client.close()


async def test_chat_rendering_takes_tool_turns_and_template_options(real_replica: Proc) -> None:
    stub = replica_pb2_grpc.ReplicaStub(member_channel(real_replica.address))
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    tool = {
        "type": "function",
        "function": {"name": "weather", "description": None, "parameters": {"type": "object"}},
    }
    turns = [
        replica_pb2.ChatMessage(role="user", content="Weather in Paris?", name="ann"),
        replica_pb2.ChatMessage(
            role="assistant", content_is_null=True, tool_calls_json=json.dumps([call])
        ),
        replica_pb2.ChatMessage(role="tool", content="sunny, 21 C", tool_call_id="c1"),
    ]
    with_tools = await stub.Tokenize(
        replica_pb2.TokenizeRequest(messages=turns, tools_json=json.dumps([tool]))
    )
    text = (await stub.Detokenize(replica_pb2.DetokenizeRequest(tokens=with_tools.tokens))).prompt
    # SmolLM2's template renders a null content as empty and ignores tools.
    assert "<|im_start|>assistant\n<|im_end|>" in text
    assert "<|im_start|>tool\nsunny, 21 C<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    partial = [
        replica_pb2.ChatMessage(role="user", content="Capital of France?"),
        replica_pb2.ChatMessage(role="assistant", content="The capital is"),
    ]
    continued = await stub.Tokenize(
        replica_pb2.TokenizeRequest(
            messages=partial,
            chat_template=replica_pb2.ChatTemplateOptions(
                add_generation_prompt=False, continue_final_message=True
            ),
        )
    )
    text = (await stub.Detokenize(replica_pb2.DetokenizeRequest(tokens=continued.tokens))).prompt
    assert text.endswith("<|im_start|>assistant\nThe capital is")


async def wait_load(
    client: StreamClient, check: Callable[[replica_pb2.Load], bool], timeout: float = 10
) -> replica_pb2.Load:
    """The replica's load once `check` holds for it."""
    async with asyncio.timeout(timeout):
        while True:
            load = (await client.health()).load
            if check(load):
                return load
            await asyncio.sleep(0.1)


def replica_metrics(proc: Proc) -> dict[str, float]:
    """The replica's /metrics samples, by name (one model per replica)."""
    text = httpx.get(f"http://127.0.0.1:{proc.extra['metrics_port']}/metrics", timeout=5).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


async def test_a_repeated_prompt_is_served_from_the_prefix_cache(real_replica: Proc) -> None:
    """The CPU build honours automatic prefix caching: the same ~600-token prompt sent again
    finds every whole KV block before its last token already computed."""
    assert f"prefix caching on (blocks of {BLOCK_TOKENS} tokens)" in real_replica.log()
    # A new first block, so nothing earlier in the session can match it.
    prompt = f"Ticket {uuid.uuid4().hex}.\n" + "\n".join(
        f"Line {i}: the sensor on rack {i % 7} reported {i * 13 % 97} degrees." for i in range(32)
    )
    client = StreamClient(real_replica.address)
    try:
        before = await wait_load(client, lambda load: load.running == 0)
        first = await client.run(completion("prefix-1", prompt, max_tokens=4, temperature=0))
        n = first.prompt_tokens
        after_first = await wait_load(
            client, lambda load: load.prefix_cache_queries >= before.prefix_cache_queries + n
        )
        second = await client.run(completion("prefix-2", prompt, max_tokens=4, temperature=0))
        after_second = await wait_load(
            client, lambda load: load.prefix_cache_queries >= after_first.prefix_cache_queries + n
        )
    finally:
        await client.close()
    assert 500 <= n <= 700 and second.prompt_tokens == n, n
    assert second.text == first.text  # reused KV blocks give the same greedy answer
    first_hits = after_first.prefix_cache_hits - before.prefix_cache_hits
    second_hits = after_second.prefix_cache_hits - after_first.prefix_cache_hits
    assert after_second.prefix_cache_queries - after_first.prefix_cache_queries == n
    assert first_hits == 0
    assert n - BLOCK_TOKENS <= second_hits < n, (n, second_hits)
    assert after_second.prefix_cache_hit_rate > 0
    samples = replica_metrics(real_replica)
    assert samples["mss_replica_prefix_cache_queries_total"] == after_second.prefix_cache_queries
    assert samples["mss_replica_prefix_cache_hits_total"] == after_second.prefix_cache_hits
    assert samples["mss_replica_prefix_cache_hit_rate"] == pytest.approx(
        after_second.prefix_cache_hit_rate
    )
    print(
        f"prompt {n} tokens; hits {first_hits} then {second_hits}; "
        f"hit rate {after_second.prefix_cache_hit_rate:.3f} "
        f"({after_second.prefix_cache_hits}/{after_second.prefix_cache_queries} tokens in all)"
    )
