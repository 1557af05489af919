"""The response cache's store (`gateway/response_cache.py`): its tiers, bounds, expiry and
failures, with fake clocks; the Redis tests use a throwaway `redis-server`."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from gateway import metrics, response_cache
from gateway.response_cache import (
    KEY_BYTES,
    REDIS_PREFIX,
    RedisTier,
    ResponseCache,
    storage_key,
)
from mss.config import ConfigError, GatewaySettings, ResponseCacheStore, parse_config
from mss.processes import free_port
from tests.support import Proc, start_redis

MODEL = "m"
VALUE = b"v" * 100
ENTRY = KEY_BYTES + len(VALUE)
"""Bytes one entry of VALUE counts."""


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sample(name: str, **labels: str) -> float:
    """The exported value, as a scrape sees it (the batches flushed)."""
    metrics.flush()
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def key(n: int | str) -> bytes:
    return f"request-{n}".encode()


@asynccontextmanager
async def opened(settings: ResponseCacheStore, **clocks: Any) -> AsyncIterator[ResponseCache]:
    cache = ResponseCache(settings, **clocks)
    await cache.start()
    try:
        yield cache
    finally:
        await cache.close()


# Memory tier


async def test_memory_hit_and_miss_are_counted() -> None:
    hits = sample("mss_gateway_response_cache_hits_total", model=MODEL, tier="memory")
    misses = sample("mss_gateway_response_cache_misses_total", model=MODEL)
    async with opened(ResponseCacheStore()) as cache:
        await cache.put(MODEL, key(1), VALUE, ttl_s=60)
        assert await cache.get(MODEL, key(1)) == VALUE
        assert await cache.get(MODEL, key(2)) is None
        assert await cache.get("other", key(1)) is None, "the model is part of the key"
    assert sample("mss_gateway_response_cache_hits_total", model=MODEL, tier="memory") == hits + 1
    assert sample("mss_gateway_response_cache_misses_total", model=MODEL) == misses + 1


async def test_memory_is_lru_bounded_by_key_and_value_bytes() -> None:
    evictions = sample("mss_gateway_response_cache_evictions_total", tier="memory")
    async with opened(ResponseCacheStore(max_bytes=8 * ENTRY)) as cache:
        for n in range(8):
            await cache.put(MODEL, key(n), VALUE, ttl_s=60)
        assert cache.memory.bytes == 8 * ENTRY
        assert await cache.get(MODEL, key(0)) == VALUE  # now the most recent
        await cache.put(MODEL, key(8), VALUE, ttl_s=60)

        assert await cache.get(MODEL, key(1)) is None, "the least recently used left"
        for n in (0, *range(2, 9)):
            assert await cache.get(MODEL, key(n)) == VALUE
        assert cache.memory.bytes == 8 * ENTRY
        assert sample("mss_gateway_response_cache_bytes", tier="memory") == 8 * ENTRY
    assert sample("mss_gateway_response_cache_evictions_total", tier="memory") == evictions + 1


async def test_memory_entry_expires_after_its_ttl() -> None:
    clock = FakeClock()
    async with opened(ResponseCacheStore(), clock=clock) as cache:
        await cache.put(MODEL, key(1), VALUE, ttl_s=10)
        clock.now += 9.9
        assert await cache.get(MODEL, key(1)) == VALUE
        clock.now += 0.2
        assert await cache.get(MODEL, key(1)) is None
        assert len(cache.memory) == 0 and cache.memory.bytes == 0, "an expired entry is dropped"


async def test_expired_entries_make_room_without_counting_as_evictions() -> None:
    clock = FakeClock()
    evictions = sample("mss_gateway_response_cache_evictions_total", tier="memory")
    async with opened(ResponseCacheStore(max_bytes=8 * ENTRY), clock=clock) as cache:
        for n in range(8):
            await cache.put(MODEL, key(n), VALUE, ttl_s=1)
        clock.now += 2
        await cache.put(MODEL, key(8), VALUE, ttl_s=1)
    assert sample("mss_gateway_response_cache_evictions_total", tier="memory") == evictions


async def test_entry_over_an_eighth_of_the_bound_is_not_stored() -> None:
    async with opened(ResponseCacheStore(max_bytes=8 * ENTRY - 1)) as cache:
        await cache.put(MODEL, key(1), VALUE[:-1], ttl_s=60)
        assert await cache.get(MODEL, key(1)) == VALUE[:-1]
        await cache.put(MODEL, key(1), VALUE, ttl_s=60)  # one byte too many
        assert await cache.get(MODEL, key(1)) is None, "the older value is not answered either"
        assert cache.memory.bytes == 0


async def test_no_memory_tier_at_zero_bytes() -> None:
    async with opened(ResponseCacheStore(max_bytes=0)) as cache:
        await cache.put(MODEL, key(1), b"x", ttl_s=60)
        assert await cache.get(MODEL, key(1)) is None


# SQLite tier


async def test_sqlite_entries_outlive_the_cache_and_expire_on_the_wall_clock(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "sub" / "cache.sqlite")  # the folder is created
    settings = ResponseCacheStore(sqlite_path=path)
    wall = FakeClock(1_700_000_000.0)
    async with opened(settings, wall_clock=wall) as first:
        await first.put(MODEL, key(1), VALUE, ttl_s=30)
        await first.put(MODEL, key(2), VALUE, ttl_s=5)

    hits = sample("mss_gateway_response_cache_hits_total", model=MODEL, tier="sqlite")
    wall.now += 10
    clock = FakeClock()
    async with opened(settings, wall_clock=wall, clock=clock) as second:
        assert await second.get(MODEL, key(1)) == VALUE
        assert await second.get(MODEL, key(2)) is None, "expired while the gateway was down"
        assert sample("mss_gateway_response_cache_hits_total", model=MODEL, tier="sqlite") == (
            hits + 1
        )
        assert len(second.memory) == 1, "an SQLite hit is kept in memory"
        assert await second.get(MODEL, key(1)) == VALUE
        assert sample("mss_gateway_response_cache_hits_total", model=MODEL, tier="sqlite") == (
            hits + 1
        ), "the second lookup was answered from memory"
        clock.now += 20.5  # the copy in memory expires with the row: 20 s were left
        assert second.memory.get(storage_key(MODEL, key(1))) is None

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT count(*) FROM response_cache").fetchone()[0] == 1


async def test_sqlite_bound_evicts_the_least_recently_used_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "cache.sqlite")
    settings = ResponseCacheStore(max_bytes=0, sqlite_path=path, sqlite_max_bytes=8 * ENTRY)
    wall = FakeClock(1_700_000_000.0)
    evictions = sample("mss_gateway_response_cache_evictions_total", tier="sqlite")
    async with opened(settings, wall_clock=wall) as cache:
        for n in range(8):
            await cache.put(MODEL, key(n), VALUE, ttl_s=3600)
            wall.now += 1
        assert await cache.get(MODEL, key(0)) == VALUE  # used last now
        wall.now += 1
        await cache.put(MODEL, key(8), VALUE, ttl_s=3600)
        await cache.put(MODEL, key("big"), VALUE * 2, ttl_s=3600)  # over an eighth: not written

    async with opened(settings, wall_clock=wall) as reopened:
        assert await reopened.get(MODEL, key(1)) is None
        assert await reopened.get(MODEL, key("big")) is None
        for n in (0, *range(2, 9)):
            assert await reopened.get(MODEL, key(n)) == VALUE
    assert sample("mss_gateway_response_cache_evictions_total", tier="sqlite") == evictions + 1
    with sqlite3.connect(path) as db:
        (total,) = db.execute("SELECT bytes FROM response_cache_total").fetchone()
        (summed,) = db.execute("SELECT sum(size) FROM response_cache").fetchone()
    assert total == summed == 8 * ENTRY


async def test_sqlite_eviction_deletes_expired_rows_first(tmp_path: Path) -> None:
    path = str(tmp_path / "cache.sqlite")
    settings = ResponseCacheStore(max_bytes=0, sqlite_path=path, sqlite_max_bytes=8 * ENTRY)
    wall = FakeClock(1_700_000_000.0)
    evictions = sample("mss_gateway_response_cache_evictions_total", tier="sqlite")
    async with opened(settings, wall_clock=wall) as cache:
        await cache.put(MODEL, key("old"), VALUE, ttl_s=3600)
        for n in range(7):
            await cache.put(MODEL, key(n), VALUE, ttl_s=1)
        wall.now += 2
        await cache.put(MODEL, key(7), VALUE, ttl_s=3600)
        assert await cache.get(MODEL, key("old")) == VALUE, "room came from the expired rows"
    assert sample("mss_gateway_response_cache_evictions_total", tier="sqlite") == evictions
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM response_cache").fetchone()[0] == 2


async def test_sqlite_file_shared_by_caches_open_at_once(tmp_path: Path) -> None:
    """As gateway workers share it: each its own connection, writing at the same time."""
    settings = ResponseCacheStore(max_bytes=0, sqlite_path=str(tmp_path / "cache.sqlite"))
    async with opened(settings) as one, opened(settings) as two:
        await asyncio.gather(
            *(cache.put(MODEL, key(n), VALUE, ttl_s=60) for n in range(20) for cache in (one, two))
        )
        for n in range(20):
            assert await one.get(MODEL, key(n)) == VALUE
            assert await two.get(MODEL, key(n)) == VALUE


async def test_an_unreadable_sqlite_file_leaves_memory_caching(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"not a database, " * 512)
    errors = sample("mss_gateway_response_cache_errors_total", tier="sqlite")
    async with opened(ResponseCacheStore(sqlite_path=str(path))) as cache:
        await cache.put(MODEL, key(1), VALUE, ttl_s=60)
        assert await cache.get(MODEL, key(1)) == VALUE
        assert await cache.get(MODEL, key(2)) is None
    assert sample("mss_gateway_response_cache_errors_total", tier="sqlite") == errors + 1
    assert "cannot open SQLite file" in caplog.text


# Redis tier


async def test_redis_entry_is_shared_by_two_caches(redis_server: Proc) -> None:
    settings = ResponseCacheStore(redis_url=redis_server.address)
    request = secrets.token_bytes(16)
    hits = sample("mss_gateway_response_cache_hits_total", model=MODEL, tier="redis")
    async with opened(settings) as one, opened(settings) as two:
        await one.put(MODEL, request, VALUE, ttl_s=60)
        assert await two.get(MODEL, request) == VALUE
        assert len(two.memory) == 1, "a Redis hit is kept in memory"
    assert sample("mss_gateway_response_cache_hits_total", model=MODEL, tier="redis") == hits + 1


async def test_redis_keys_are_prefixed_hashes_written_with_px(redis_server: Proc) -> None:
    request = secrets.token_bytes(16)
    async with opened(ResponseCacheStore(redis_url=redis_server.address)) as cache:
        await cache.put(MODEL, request, VALUE, ttl_s=0.3)
    client = aioredis.Redis.from_url(redis_server.address)
    try:
        name = REDIS_PREFIX + storage_key(MODEL, request)
        assert len(name) == len(REDIS_PREFIX) + KEY_BYTES
        assert 0 < await client.pttl(name) <= 300
        assert await client.get(name) == VALUE

        async def gone() -> bool:
            return not await client.exists(name)

        await until(gone, "Redis to drop the entry after its TTL")
    finally:
        await client.aclose()


async def test_redis_hit_keeps_in_memory_only_for_the_time_left(redis_server: Proc) -> None:
    request = secrets.token_bytes(16)
    settings = ResponseCacheStore(redis_url=redis_server.address)
    clock = FakeClock()
    async with opened(settings) as writer, opened(settings, clock=clock) as reader:
        await writer.put(MODEL, request, VALUE, ttl_s=5)
        assert await reader.get(MODEL, request) == VALUE
        clock.now += 5.01
        assert reader.memory.get(storage_key(MODEL, request)) is None


async def test_redis_down_is_a_miss_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = ResponseCacheStore(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    errors = sample("mss_gateway_response_cache_errors_total", tier="redis")
    caplog.set_level(logging.WARNING, logger=response_cache.__name__)
    started = time.monotonic()
    async with opened(settings) as cache:
        assert isinstance(cache.second, RedisTier) and not cache.second.up
        assert await cache.get(MODEL, key("absent")) is None
        await cache.put(MODEL, key(1), VALUE, ttl_s=60)
        assert await cache.get(MODEL, key(1)) == VALUE, "memory still caches"
    assert time.monotonic() - started < 1.5
    assert sample("mss_gateway_response_cache_errors_total", tier="redis") >= errors + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


async def test_a_redis_that_never_answers_costs_one_timeout() -> None:
    """A server that accepts and then says nothing (hung, or a black-holed route)."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = ResponseCacheStore(redis_url=f"redis://127.0.0.1:{port}/0")
        started = time.monotonic()
        async with opened(settings) as cache:  # its ping times out: Redis is down
            assert await cache.get(MODEL, key("absent")) is None
            await cache.put(MODEL, key(1), VALUE, ttl_s=60)
            assert await cache.get(MODEL, key(1)) == VALUE
            elapsed = time.monotonic() - started
        assert response_cache.REDIS_TIMEOUT_S <= elapsed < 2 * response_cache.REDIS_TIMEOUT_S
    finally:
        server.close()
        await server.wait_closed()


async def test_redis_back_after_an_outage_is_used_again(redis_binary: str) -> None:
    port = free_port()
    settings = ResponseCacheStore(redis_url=f"redis://127.0.0.1:{port}/0")
    async with opened(settings) as cache:
        tier = cache.second
        assert isinstance(tier, RedisTier) and not tier.up
        server = start_redis(redis_binary, port)
        try:

            async def up() -> bool:
                return tier.up

            await until(up, "the reconnect task to find the server")
            await cache.put(MODEL, key(1), VALUE, ttl_s=60)
            async with opened(settings) as other:
                assert await other.get(MODEL, key(1)) == VALUE
        finally:
            server.stop()


# Config


def test_store_defaults_and_home_expansion() -> None:
    store = GatewaySettings().response_cache
    assert store.max_bytes == 256 * 1024 * 1024 and store.sqlite_max_bytes == 1 << 30
    assert store.sqlite_path is None and store.redis_url is None
    expanded = ResponseCacheStore(sqlite_path="~/rc.sqlite").sqlite_path
    assert expanded == os.path.expanduser("~/rc.sqlite") and not expanded.startswith("~")


def test_sqlite_and_redis_together_are_refused() -> None:
    text = """
gateway:
  response_cache:
    sqlite_path: /tmp/rc.sqlite
    redis_url: redis://:secret@127.0.0.1:6379/0
"""
    with pytest.raises(
        ConfigError, match=r"sqlite_path '/tmp/rc\.sqlite' and redis_url are both set"
    ):
        parse_config(text)


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis:/x"])
def test_redis_url_needs_a_redis_scheme(url: str) -> None:
    with pytest.raises(ConfigError, match="redis_url scheme"):
        parse_config(f"gateway: {{response_cache: {{redis_url: '{url}'}}}}")


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h", "unix:///run/redis.sock"])
def test_redis_url_schemes_accepted(url: str) -> None:
    assert ResponseCacheStore(redis_url=url).redis_url == url
