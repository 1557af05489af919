"""Migration with the real engine: streams outlive a killed replica and a dead engine core.

Two replicas of the bundled model (the session's shared one and one started
here) sit behind a gateway. Greedy streams (temperature 0) run on both; one
replica is then killed outright, or only its vLLM engine-core process is.
Each stream must end normally with exactly the text of an uninterrupted run,
continued on the surviving replica from the token ids it had produced. After
the engine-core kill the replica must stop saying it is ready, log one line
per request it failed (no traceback per request), and exit with an error so
a scheduler would restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import psutil
import pytest

from tests.support import Proc, health, sse_events, start_gateway, start_replica

pytestmark = pytest.mark.engine

MODEL = "smollm2"
TOKENS = 48
OUTPUT_EVENTS = 2  # SSE events a stream has read before it counts as having output
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The first president of the United States was",
    "A week has seven days: Monday,",
]
CONFIG = f"""
deployments:
  - name: {MODEL}
    routing: round_robin  # the streams alternate: two of the four are on the victim
    limits: {{max_tokens: {TOKENS}}}
"""


@pytest.fixture
def victim() -> Iterator[Proc]:
    """A second real replica, the one that fails."""
    proc = start_replica(engine="vllm", extra_args=["--drain-timeout", "2"])
    try:
        yield proc
    finally:
        proc.stop()


async def complete(http: httpx.AsyncClient, prompt: str) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0}
    reply = await http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["text"])


@dataclass
class Progress:
    """How far one client stream has come: SSE events read, and whether it ended."""

    events: int = 0
    done: bool = False


async def stream(http: httpx.AsyncClient, prompt: str, progress: Progress) -> str:
    """A greedy completion streamed, its progress kept in `progress`."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    raw = b""
    try:
        async with http.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200, await reply.aread()
            async for chunk in reply.aiter_bytes():
                raw += chunk
                progress.events += chunk.count(b"data: ")
    finally:
        progress.done = True
    text = ""
    for name, data in sse_events(raw.decode()):
        assert name != "error" and not (isinstance(data, dict) and "error" in data), data
        choices = data.get("choices") if isinstance(data, dict) else None
        if isinstance(choices, list) and choices:
            text += str(choices[0].get("text") or "")
    return text


async def streams_cut_midway(
    http: httpx.AsyncClient, fault: str, victim: Proc
) -> tuple[list[str], int]:
    """Stream every prompt and fail the victim while it runs some of them with output.

    Both replicas share two cores, and one engine may run far ahead of the other:
    the victim can finish its streams before the other replica's have begun. The
    fault comes once the victim runs a request and every stream still going has
    output (so the victim's have), polled as the streams run. Should every stream
    end before that moment, they are run again, up to three times. Returns the
    streams' texts and what the victim ran as it failed.
    """
    for _ in range(3):
        progress = [Progress() for _ in PROMPTS]
        streams = [
            asyncio.create_task(stream(http, p, s)) for p, s in zip(PROMPTS, progress, strict=True)
        ]
        deadline = asyncio.get_running_loop().time() + 240
        while not all(s.done for s in progress):
            assert asyncio.get_running_loop().time() < deadline, "the streams did not progress"
            going = [s for s in progress if not s.done]
            running = (await asyncio.to_thread(health, victim.address)).load.running
            if running and all(s.events >= OUTPUT_EVENTS for s in going):
                fail(fault, victim)
                return await asyncio.wait_for(asyncio.gather(*streams), 300), running
            await asyncio.sleep(0.02)
        await asyncio.gather(*streams)
    raise AssertionError("the victim finished its streams before the others had output, 3 times")


def fail(fault: str, victim: Proc) -> None:
    if fault == "replica":
        victim.kill()
        return
    cores = [
        p
        for p in psutil.Process(victim.proc.pid).children(recursive=True)
        if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())
    ]
    assert cores, "no engine-core process under the replica"
    for core in cores:
        core.kill()


async def run_with_fault(gateway: Proc, fault: str, victim: Proc) -> None:
    async with httpx.AsyncClient(base_url=gateway.address, timeout=300) as http:
        # References: each prompt once, uninterrupted, with ignore_eos as the streams.
        references = []
        for prompt in PROMPTS:
            body = {
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": TOKENS,
                "temperature": 0,
                "ignore_eos": True,
            }
            reply = await http.post("/v1/completions", json=body)
            assert reply.status_code == 200, reply.text
            references.append(str(reply.json()["choices"][0]["text"]))
        texts, running = await streams_cut_midway(http, fault, victim)
        assert texts == references
        metrics = (await http.get("/metrics")).text
    moved = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("mss_gateway_migrations_total{") and 'outcome="moved"' in line
    )
    assert moved >= 1, f"no stream moved; the failed replica ran {running} requests as it failed"


async def test_greedy_streams_survive_a_killed_replica_word_for_word(
    real_replica: Proc, victim: Proc
) -> None:
    gateway = start_gateway(
        [(MODEL, real_replica.address), (MODEL, victim.address)], config=CONFIG, timeout=60
    )
    try:
        await run_with_fault(gateway, "replica", victim)
    finally:
        gateway.stop()


async def test_a_dead_engine_core_moves_its_streams_and_stops_its_replica(
    real_replica: Proc, victim: Proc
) -> None:
    gateway = start_gateway(
        [(MODEL, real_replica.address), (MODEL, victim.address)], config=CONFIG, timeout=60
    )
    try:
        await run_with_fault(gateway, "engine_core", victim)
        # Not ready from the moment the core died, then gone with an error status.
        with contextlib.suppress(grpc.RpcError):  # exited already: the other good outcome
            assert not health(victim.address, timeout=2.0).ready
        assert victim.proc.wait(60) == 1
        log = victim.log()
        assert "engine died" in log
        assert "engine failed the request" not in log  # no per-request traceback
        failed = [line for line in log.splitlines() if "failed: engine died" in line]
        assert len(failed) <= len(PROMPTS), failed
        # The survivor keeps serving, and new requests never reach the dead one.
        async with httpx.AsyncClient(base_url=gateway.address, timeout=120) as http:
            assert await complete(http, PROMPTS[0])
    finally:
        gateway.stop()
