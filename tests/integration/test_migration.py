"""Started streams survive their replica: killed, or stopped past its drain deadline.

Two fake-engine replicas behind one gateway serve closed-loop clients on the
three kinds of route (the seed route, OpenAI completions streamed, and OpenAI
chat not streamed). One replica is then killed outright, or told to stop
with a drain deadline shorter than the requests. Every request must finish
with exactly the text of an uninterrupted run (the fake engine's text depends
only on the prompt, so each prompt's reference is fetched first), none may
end with an error, and no stream may stall for long while it moves.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.support import Proc, sse_events, start_gateway, start_replica

MODEL = "smollm2"
TOKENS = 40
INTERVAL_MS = 20
CLIENTS = 12
CONFIG = f"""
deployments:
  - name: {MODEL}
    engine: fake
    model: fake
    limits: {{max_tokens: {TOKENS}}}
"""
STOP = "never said by the fake engine"
MAX_STALL_S = 2.0
"""Longest gap allowed between two chunks of one stream (normally 20 ms; a move costs
the failure's detection, a new submission and one engine step)."""


@dataclass
class Tally:
    done: int = 0
    wrong: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stall: float = 0.0


def prompt(i: int) -> str:
    return f"client {i} asks for a story"


async def reference(http: httpx.AsyncClient, text: str) -> str:
    body = {"model": MODEL, "prompt": text, "max_tokens": TOKENS, "temperature": 0}
    reply = await http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["text"])


async def seed_stream(http: httpx.AsyncClient, text: str, tally: Tally) -> str:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": TOKENS}
    return await _stream(http, f"/v1/chat/{MODEL}", body, tally, "token")


async def completion_stream(http: httpx.AsyncClient, text: str, tally: Tally) -> str:
    # A stop string that never matches makes the replica hold back the text's tail (it
    # could be the start of one): a move must deliver that tail too.
    body = {
        "model": MODEL,
        "prompt": text,
        "max_tokens": TOKENS,
        "stream": True,
        "stop": [STOP],
    }
    return await _stream(http, "/v1/completions", body, tally, "text")


async def _stream(
    http: httpx.AsyncClient, path: str, body: dict[str, object], tally: Tally, key: str
) -> str:
    chunks: list[bytes] = []
    last = time.monotonic()
    async with http.stream("POST", path, json=body) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for chunk in reply.aiter_bytes():
            now = time.monotonic()
            tally.stall = max(tally.stall, now - last)
            last = now
            chunks.append(chunk)
    text = ""
    for name, data in sse_events(b"".join(chunks).decode()):
        if name == "error" or (isinstance(data, dict) and data.get("finish_reason") == "error"):
            raise AssertionError(f"stream ended with an error: {data}")
        if not isinstance(data, dict):
            continue
        choices = data.get("choices")
        if isinstance(choices, list) and choices:  # an OpenAI chunk
            text += str(choices[0].get(key) or "")
        else:  # the seed route's event
            text += str(data.get(key) or "")
    return text


async def chat_body(http: httpx.AsyncClient, text: str, tally: Tally) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": TOKENS}
    reply = await http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


async def references(url: str) -> dict[int, tuple[str, str]]:
    """Each client's expected texts: (as a completion, as chat), from uninterrupted runs."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def one(i: int) -> tuple[str, str]:
            chat = {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt(i)}],
                "max_tokens": TOKENS,
            }
            reply = await http.post("/v1/chat/completions", json=chat)
            assert reply.status_code == 200, reply.text
            answer: str = reply.json()["choices"][0]["message"]["content"]
            return await reference(http, prompt(i)), answer

        texts = await asyncio.gather(*(one(i) for i in range(CLIENTS)))
    return dict(enumerate(texts))


async def load(
    url: str, expected: dict[int, tuple[str, str]], until: asyncio.Event, tally: Tally
) -> None:
    """Closed-loop clients until `until` is set, each checking every answer."""
    kinds = [seed_stream, completion_stream, chat_body]
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def client(i: int) -> None:
            kind = kinds[i % len(kinds)]
            want = expected[i][0] if kind is completion_stream else expected[i][1]
            while not until.is_set():
                try:
                    got = await kind(http, prompt(i), tally)
                except (AssertionError, httpx.HTTPError) as exc:
                    tally.failed.append(f"{kind.__name__}: {exc}")
                    continue
                tally.done += 1
                if got != want:
                    tally.wrong.append(f"{kind.__name__}: {got!r} != {want!r}")

        await asyncio.gather(*(client(i) for i in range(CLIENTS)))


@pytest.fixture
def stack() -> Iterator[tuple[list[Proc], Proc]]:
    replicas = [
        start_replica(token_interval_ms=INTERVAL_MS, extra_args=["--drain-timeout", "0.3"])
        for _ in range(2)
    ]
    gateway = start_gateway([(MODEL, r.address) for r in replicas], config=CONFIG)
    yield replicas, gateway
    for proc in (gateway, *replicas):
        proc.stop(timeout=15)


@pytest.mark.parametrize("how", ["kill", "drain_deadline"])
async def test_streams_move_off_a_failing_replica_with_nothing_lost(
    stack: tuple[list[Proc], Proc], how: str
) -> None:
    replicas, gateway = stack
    expected = await references(gateway.address)
    until = asyncio.Event()
    tally = Tally()
    clients = asyncio.create_task(load(gateway.address, expected, until, tally))
    await asyncio.sleep(2.0)  # every client mid-stream on one replica or the other
    victim = replicas[0]
    if how == "kill":
        victim.kill()
    else:
        victim.proc.send_signal(signal.SIGTERM)  # drains 0.3 s, then cancels the rest
    await asyncio.sleep(3.0)
    until.set()
    await asyncio.wait_for(clients, 60)

    assert tally.failed == [] and tally.wrong == []
    assert tally.done >= CLIENTS
    assert tally.stall < MAX_STALL_S, f"a stream stalled {tally.stall:.2f} s"
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{gateway.address}/metrics")).text
    moved = [
        line
        for line in metrics.splitlines()
        if line.startswith("mss_gateway_migrations_total{") and 'outcome="moved"' in line
    ]
    assert moved and sum(float(line.rsplit(" ", 1)[1]) for line in moved) > 0, metrics
    assert "gave_up" not in "".join(moved)
    assert gateway.stop() == 0  # a clean SIGTERM: drained, status 0
