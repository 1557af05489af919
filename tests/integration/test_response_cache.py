"""The response cache and request coalescing against real processes.

A fake-engine replica behind `mss gateway` with the deployment's response
cache and coalescing on. What reaches the engine is read from the replica's
own request counter (`mss_replica_requests_total`), so "served from the cache"
means the replica never saw the request.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Proc, sse_events, start_gateway, start_replica

MODEL = "cached"
TOKEN_INTERVAL_MS = 20.0
"""Slow enough that ten identical requests sent together all find the first in flight."""


def config(store: str = "", coalesce: bool = True) -> str:
    return f"""
gateway:
  response_cache: {{{store}}}
deployments:
  - name: {MODEL}
    engine: fake
    model: fake
    limits: {{max_tokens: 24}}
    response_cache: {{enabled: true, ttl_s: 600, coalesce: {str(coalesce).lower()}}}
"""


@pytest.fixture(scope="module")
def replica() -> Iterator[Proc]:
    proc = start_replica(name=MODEL, token_interval_ms=TOKEN_INTERVAL_MS)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def gateway(replica: Proc) -> Iterator[Proc]:
    proc = start_gateway([(MODEL, replica.address)], config=config())
    try:
        yield proc
    finally:
        proc.stop()


def engine_requests(replica: Proc) -> dict[str, float]:
    """The replica's finished requests by outcome."""
    text = httpx.get(f"http://127.0.0.1:{replica.extra['metrics_port']}/metrics").text
    out: dict[str, float] = {}
    pattern = r'^mss_replica_requests_total\{model="[^"]*",outcome="([^"]+)"\} (\S+)$'
    for outcome, value in re.findall(pattern, text, re.M):
        out[outcome] = out.get(outcome, 0.0) + float(value)
    return out


def settled(replica: Proc, total: float, timeout: float = 5.0) -> dict[str, float]:
    """The replica's counts once they add up to at least `total` (they land just after the
    gateway's response), or as they are at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        counts = engine_requests(replica)
        if sum(counts.values()) >= total or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def chat(url: str, content: str, stream: bool = False, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": stream}
    body |= extra
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def streamed_text(response: httpx.Response) -> str:
    text = ""
    for _, data in sse_events(response.text):
        choices = data.get("choices") if isinstance(data, dict) else None
        for choice in choices if isinstance(choices, list) else []:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


def test_deterministic_request_is_answered_from_the_cache(gateway: Proc, replica: Proc) -> None:
    before = sum(engine_requests(replica).values())
    first = chat(gateway.address, "tell me about caches", temperature=0)
    assert first.status_code == 200, first.text
    assert first.headers["x-cache"] == "MISS"
    text = first.json()["choices"][0]["message"]["content"]
    assert text
    after_first = sum(settled(replica, before + 1).values())
    assert after_first == before + 1

    again = chat(gateway.address, "tell me about caches", temperature=0)
    assert again.status_code == 200, again.text
    assert again.headers["x-cache"] == "HIT"
    body = again.json()
    assert body["choices"][0]["message"]["content"] == text
    assert body["usage"] == first.json()["usage"]
    assert body["id"] != first.json()["id"]

    # The same generation replays as a stream too: the entry is the engine's output.
    streamed = chat(gateway.address, "tell me about caches", stream=True, temperature=0)
    assert streamed.headers["x-cache"] == "HIT"
    assert streamed_text(streamed) == text
    assert streamed.text.rstrip().endswith("data: [DONE]")
    time.sleep(0.3)
    assert sum(engine_requests(replica).values()) == after_first


def test_a_seed_makes_a_request_cacheable(gateway: Proc, replica: Proc) -> None:
    first = chat(gateway.address, "seeded", temperature=0.8, seed=7)
    again = chat(gateway.address, "seeded", temperature=0.8, seed=7)
    other = chat(gateway.address, "seeded", temperature=0.8, seed=8)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
    assert other.headers["x-cache"] == "MISS"


def test_non_deterministic_request_is_never_cached(gateway: Proc, replica: Proc) -> None:
    before = sum(engine_requests(replica).values())
    for _ in range(2):
        response = chat(gateway.address, "sampled freely", temperature=0.7)
        assert response.status_code == 200
        assert "x-cache" not in response.headers
    assert sum(settled(replica, before + 2).values()) == before + 2


def test_cache_control_no_cache_asks_the_engine(gateway: Proc, replica: Proc) -> None:
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "fresh please"}],
        "temperature": 0,
    }
    url = f"{gateway.address}/v1/chat/completions"
    assert httpx.post(url, json=body).headers["x-cache"] == "MISS"
    before = sum(settled(replica, 1).values())
    fresh = httpx.post(url, json=body, headers={"cache-control": "no-cache"})
    assert fresh.status_code == 200
    assert fresh.headers["x-cache"] == "BYPASS"
    assert sum(settled(replica, before + 1).values()) == before + 1
    assert httpx.post(url, json=body).headers["x-cache"] == "HIT"


async def _stream(
    client: httpx.AsyncClient, url: str, content: str, leave_after_first: bool = False
) -> tuple[str, str]:
    """(x-cache, text) of one greedy streamed chat; with `leave_after_first`, the client
    disconnects once the first chunk arrived."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "temperature": 0,
    }
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        state = response.headers["x-cache"]
        text = ""
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += (choice.get("delta") or {}).get("content") or ""
                if leave_after_first:
                    break
    return state, text


def test_identical_concurrent_requests_share_one_generation(gateway: Proc, replica: Proc) -> None:
    before = sum(engine_requests(replica).values())

    async def main() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(_stream(client, gateway.address, "ten at once") for _ in range(10))
            )

    results = asyncio.run(main())
    texts = {text for _, text in results}
    assert len(texts) == 1 and texts != {""}
    states = sorted(state for state, _ in results)
    assert states.count("MISS") == 1, states
    assert set(states) <= {"MISS", "COALESCED", "HIT"}
    assert sum(settled(replica, before + 1).values()) == before + 1
    time.sleep(0.3)
    assert sum(engine_requests(replica).values()) == before + 1


def test_one_client_leaving_does_not_stop_the_others(gateway: Proc, replica: Proc) -> None:
    before = engine_requests(replica)

    async def main() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(timeout=30) as client:
            stayers = [
                asyncio.create_task(_stream(client, gateway.address, "some leave"))
                for _ in range(2)
            ]
            await asyncio.sleep(0.05)
            await _stream(client, gateway.address, "some leave", leave_after_first=True)
            return await asyncio.gather(*stayers)

    results = asyncio.run(main())
    alone = chat(gateway.address, "some leave", temperature=0)  # from the cache by now
    assert alone.headers["x-cache"] == "HIT"
    full = alone.json()["choices"][0]["message"]["content"]
    assert [text for _, text in results] == [full, full]
    after = settled(replica, sum(before.values()) + 1)
    assert after.get("abort", 0) == before.get("abort", 0)


def test_the_last_client_leaving_aborts_the_generation(gateway: Proc, replica: Proc) -> None:
    before = engine_requests(replica)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            leavers = (
                _stream(client, gateway.address, "everyone leaves", leave_after_first=True)
                for _ in range(3)
            )
            await asyncio.gather(*leavers)

    asyncio.run(main())
    after = settled(replica, sum(before.values()) + 1)
    assert after.get("abort", 0) == before.get("abort", 0) + 1
    # Nothing was stored: the next identical request generates again.
    assert chat(gateway.address, "everyone leaves", temperature=0).headers["x-cache"] == "MISS"


def test_two_gateways_share_hits_through_redis(replica: Proc, redis_server: Proc) -> None:
    store = f"redis_url: '{redis_server.address}'"
    first = start_gateway([(MODEL, replica.address)], config=config(store))
    second = start_gateway([(MODEL, replica.address)], config=config(store))
    try:
        before = sum(engine_requests(replica).values())
        miss = chat(first.address, "shared through redis", temperature=0)
        assert miss.headers["x-cache"] == "MISS"
        hit = chat(second.address, "shared through redis", temperature=0)
        assert hit.headers["x-cache"] == "HIT"
        assert hit.json()["choices"] == miss.json()["choices"]
        time.sleep(0.3)
        assert sum(settled(replica, before + 1).values()) == before + 1
        metrics = httpx.get(f"{second.address}/metrics").text
        assert re.search(
            r'mss_gateway_response_cache_hits_total\{[^}]*tier="redis"[^}]*\} 1', metrics
        )
    finally:
        first.stop()
        second.stop()


def test_sqlite_keeps_the_cache_across_a_restart(replica: Proc, tmp_path: Path) -> None:
    store = f"sqlite_path: '{tmp_path / 'cache.sqlite'}'"
    gateway = start_gateway([(MODEL, replica.address)], config=config(store))
    try:
        miss = chat(gateway.address, "kept on disk", temperature=0)
        assert miss.headers["x-cache"] == "MISS"
    finally:
        gateway.stop()
    before = sum(engine_requests(replica).values())
    gateway = start_gateway([(MODEL, replica.address)], config=config(store))
    try:
        hit = chat(gateway.address, "kept on disk", temperature=0)
        assert hit.headers["x-cache"] == "HIT"
        assert hit.json()["choices"] == miss.json()["choices"]
        time.sleep(0.3)
        assert sum(engine_requests(replica).values()) == before
    finally:
        gateway.stop()
