"""The engine base class, through the fake engine: tokenizing off the event loop,
arrival order, and the one cancellation path (abort, then re-raise)."""

from __future__ import annotations

import asyncio
import logging
import threading
from types import SimpleNamespace

import pytest

from mss.config import Deployment
from protos import replica_pb2
from replica.engine import Delta, InvalidRequest, PrefixCacheWindow, PromptSource
from replica.fake_engine import id_for
from replica.vllm_engine import VllmEngine
from tests.support import LONG, RecordingEngine, chat, completion


def request(rid: str, prompt: str = "hello there world") -> replica_pb2.GenerateRequest:
    return completion(rid, prompt, max_tokens=6)


async def started(token_interval_ms: float = 0.0) -> RecordingEngine:
    engine = RecordingEngine(token_interval_ms)
    await engine.start()
    return engine


async def test_fake_engine_text_is_deterministic_as_before() -> None:
    engine = await started()
    try:
        prepared = await engine.prepare(request("a"), "1-a")
        deltas = [d async for d in engine.generate(prepared)]
        assert "".join(d.text for d in deltas) == "while streams of tokens flow through"
        assert (deltas[-1].finish_reason, deltas[-1].prompt_tokens) == ("length", 3)
        prepared = await engine.prepare(chat("b", "What is the capital?", max_tokens=5), "1-b")
        assert prepared.prompt_text == "user: What is the capital?"
        # One id per word: "the" is in the fake vocabulary (id 0), the others are hashed.
        assert prepared.prompt_token_ids == [id_for(w) for w in prepared.prompt_text.split()]
        assert prepared.prompt_token_ids[3] == 0
    finally:
        await engine.shutdown()


async def test_tokenizing_runs_off_the_event_loop_while_the_loop_goes_on() -> None:
    engine = await started()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await engine.prepare(request("a", "slow prompt" + LONG), "1-a")
        assert len(engine.tokenized_on) == 1
        assert engine.tokenized_on[0] != threading.get_ident()
        assert ticks >= 5, f"the loop ticked {ticks} times during a 0.2 s tokenization"
    finally:
        task.cancel()
        await engine.shutdown()


async def test_a_small_request_is_prepared_on_the_loop_unless_the_thread_has_work() -> None:
    engine = await started()
    try:
        await engine.prepare(request("a", "short"), "1-a")
        assert engine.tokenized_on == [threading.get_ident()]
        slow = asyncio.create_task(engine.prepare(request("b", "slow" + LONG), "1-b"))
        await asyncio.sleep(0)
        await engine.prepare(request("c", "short again"), "1-c")  # behind the slow one
        await slow
        assert engine.tokenized == ["short", "slow" + LONG, "short again"]
        assert engine.tokenized_on[1] == engine.tokenized_on[2] != threading.get_ident()
    finally:
        await engine.shutdown()


async def test_the_warm_up_prepares_a_chat_and_a_prompt_on_the_thread() -> None:
    engine = await started()
    try:
        await engine.warm_up()
        assert engine.tokenized == ["", "Hi"]  # a chat (rendered from messages), a prompt
        assert all(t != threading.get_ident() for t in engine.tokenized_on)
        assert engine._jobs_submitted == engine._jobs_done  # the next request may go inline
        await engine.prepare(request("a", "short"), "1-a")
        assert engine.tokenized_on[-1] == threading.get_ident()
    finally:
        await engine.shutdown()


async def test_a_warm_up_that_fails_is_logged_and_the_engine_still_serves(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await started()

    def broken(source: PromptSource) -> tuple[str, list[int]]:
        raise RuntimeError("template exploded")

    try:
        monkeypatch.setattr(engine, "_tokenize", broken)
        with caplog.at_level(logging.WARNING):
            await engine.warm_up()  # returns: the replica goes on to say it is ready
        assert "warm-up: preparing warm-up-chat failed" in caplog.text
        assert "template exploded" in caplog.text
        monkeypatch.undo()
        prepared = await engine.prepare(request("a", "short"), "1-a")
        assert prepared.prompt_text == "short"
    finally:
        await engine.shutdown()


async def test_requests_are_tokenized_in_arrival_order() -> None:
    engine = await started()
    try:
        slow = asyncio.create_task(engine.prepare(request("a", "slow first" + LONG), "1-a"))
        fast = asyncio.create_task(engine.prepare(request("b", "fast second"), "1-b"))
        await asyncio.gather(slow, fast)
        assert engine.tokenized == ["slow first" + LONG, "fast second"]
    finally:
        await engine.shutdown()


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "word " * 3000}, "prompt"),
        ({"prompt": "hi", "sampling": {"max_tokens": 4, "temperature": -1.0}}, "temperature"),
        ({"messages": [replica_pb2.ChatMessage(role="", content="hi")]}, "messages[0].role"),
    ],
)
async def test_invalid_requests_name_the_field(fields: dict[str, object], field_name: str) -> None:
    engine = await started()
    try:
        fields = {"sampling": {"max_tokens": 4}, **fields}
        bad = replica_pb2.GenerateRequest(request_id="x", **fields)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest) as refused:
            await engine.prepare(bad, "1-x")
        assert str(refused.value).startswith(f"{field_name}:"), refused.value
    finally:
        await engine.shutdown()


async def test_cancelling_the_consumer_aborts_the_engine_request_and_re_raises() -> None:
    engine = await started(token_interval_ms=60_000)  # no token ever comes
    try:
        prepared = await engine.prepare(request("a"), "1-a")

        async def consume() -> None:
            async for _ in engine.generate(prepared):
                pass

        task = asyncio.create_task(consume())
        await asyncio.wait_for(engine.streaming.wait(), 5)
        assert await engine.running_requests() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.aborted == ["1-a"]
        assert await engine.running_requests() == 0
    finally:
        await engine.shutdown()


async def test_closing_the_stream_early_aborts_too() -> None:
    engine = await started()
    try:
        prepared = await engine.prepare(request("a"), "1-a")
        deltas = engine.generate(prepared)
        first = await anext(deltas)
        assert first.text and first.finish_reason is None
        await deltas.aclose()
        assert engine.aborted == ["1-a"]
        assert await engine.running_requests() == 0
    finally:
        await engine.shutdown()


async def test_pushed_deltas_are_the_generated_ones() -> None:
    """The server's path (`stream_to`, deltas pushed from the engine's clock) and
    `generate` give the same deltas, n choices and stop strings included."""
    engine = await started()
    try:
        for rid, req in (
            ("a", request("a")),
            ("n", completion("n", "one two", max_tokens=4, n=2)),
            ("s", completion("s", "hello there world", max_tokens=9, stop=["flow"])),
        ):
            generated = [d async for d in engine.generate(await engine.prepare(req, f"1-{rid}"))]
            pushed: list[Delta] = []
            await engine.stream_to(await engine.prepare(req, f"2-{rid}"), pushed.append)
            assert pushed == generated
            assert pushed[-1].last and await engine.running_requests() == 0
        assert engine.aborted == []
    finally:
        await engine.shutdown()


async def test_cancelling_a_pushed_request_aborts_it() -> None:
    engine = await started(token_interval_ms=10)
    try:
        prepared = await engine.prepare(request("a"), "1-a")
        pushed: list[Delta] = []
        task = asyncio.create_task(engine.stream_to(prepared, pushed.append))
        for _ in range(200):
            if pushed:
                break
            await asyncio.sleep(0.01)
        assert pushed and await engine.running_requests() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.aborted == ["1-a"]
        assert await engine.running_requests() == 0
        produced = len(pushed)
        await asyncio.sleep(0.05)
        assert len(pushed) == produced  # nothing pushed after the abort
    finally:
        await engine.shutdown()


async def test_a_failing_push_fails_its_request_only() -> None:
    engine = await started(token_interval_ms=5)
    try:

        def broken(delta: Delta) -> None:
            raise RuntimeError("consumer bug")

        prepared = await engine.prepare(request("b"), "1-b")
        bad = asyncio.create_task(engine.stream_to(prepared, broken))
        good: list[Delta] = []
        await engine.stream_to(await engine.prepare(request("g"), "1-g"), good.append)
        with pytest.raises(RuntimeError, match="consumer bug"):
            await bad
        assert good[-1].finish_reason == "length"
        assert await engine.running_requests() == 0
    finally:
        await engine.shutdown()


async def test_a_finished_request_is_not_aborted() -> None:
    engine = await started()
    try:
        prepared = await engine.prepare(request("a"), "1-a")
        assert [d async for d in engine.generate(prepared)][-1].finish_reason == "length"
        assert engine.aborted == []
    finally:
        await engine.shutdown()


def test_prefix_cache_hit_rate_covers_the_most_recent_requests() -> None:
    window = PrefixCacheWindow(max_requests=4)
    assert window.hit_rate == 0.0
    window.observe(requests=2, queries=1000, hits=0)  # two new prompts
    window.observe(requests=0, queries=0, hits=0)  # a decode-only step: not counted
    window.observe(requests=2, queries=1000, hits=1000)  # the same two again, all cached
    assert window.hit_rate == 0.5
    window.observe(requests=1, queries=500, hits=500)  # five requests: the oldest step goes
    assert window.hit_rate == 1.0
    window.observe(requests=9, queries=900, hits=0)  # a step larger than the window stays...
    assert window.hit_rate == 0.0
    window.observe(requests=1, queries=100, hits=100)  # ...until the next one
    assert window.hit_rate == 1.0
    window.clear()
    assert window.hit_rate == 0.0


async def test_the_fake_engine_reports_no_prefix_cache() -> None:
    engine = await started()
    try:
        prepared = await engine.prepare(request("a"), "1-a")
        for _ in range(2):
            [d async for d in engine.generate(prepared)]
        load = engine.load
        assert (load.prefix_cache_queries, load.prefix_cache_hits) == (0, 0)
        assert load.prefix_cache_hit_rate == 0.0
    finally:
        await engine.shutdown()


@pytest.mark.parametrize(
    ("asked", "on", "level", "said"),
    [
        (True, True, logging.INFO, "prefix caching on (blocks of 128 tokens)"),
        (True, False, logging.WARNING, "prefix caching asked for but off"),
        (False, False, logging.INFO, "prefix caching off (engine_args"),
    ],
)
def test_the_replica_says_whether_vllm_kept_prefix_caching(
    caplog: pytest.LogCaptureFixture, asked: bool, on: bool, level: int, said: str
) -> None:
    engine = VllmEngine(
        Deployment.model_validate({"name": "m", "engine_args": {"enable_prefix_caching": asked}})
    )
    # What vLLM's config holds once its platform had its say (the CPU platform turns
    # caching off for MLA models and on RISC-V).
    cache = SimpleNamespace(enable_prefix_caching=on, block_size=128)
    engine._llm = SimpleNamespace(vllm_config=SimpleNamespace(cache_config=cache))
    with caplog.at_level(logging.INFO, logger="replica.vllm_engine"):
        engine._log_prefix_caching()
    (record,) = caplog.records
    assert record.levelno == level and record.getMessage().startswith(said)
