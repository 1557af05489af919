"""Exact-match response cache: whole outputs of deterministic requests, kept by key.

`ResponseCache` is the store; the request path decides what is cacheable, builds
the key (a hash of the model and the request) and coalesces identical requests.
Two tiers at most, looked up in order:

- memory, in each gateway process: LRU bounded by key and value bytes
  (`max_bytes`), each entry with an expiry on the monotonic clock;
- one second tier, chosen by the config: a SQLite file (`SqliteTier`: survives
  restarts, shared by the workers of one machine through WAL) or a Redis server
  (`RedisTier`: shared by every gateway that names it; its size bound is Redis's
  own `maxmemory` with `maxmemory-policy allkeys-lru`).

Writes go to both tiers; an entry found in the second tier is copied into
memory for the time it has left. Expiry in the second tier is wall-clock time,
since its entries outlive the process.

The second tier never fails a request: an error is logged (a warning when a
tier starts failing, one line when it works again), counted in
`mss_gateway_response_cache_errors_total` and taken as a miss. A Redis that is
down is left alone, the cache working from memory, while a background task
pings it with backoff until it answers. Every SQLite call runs on one
connection in one thread of its own, and every Redis command is bounded by
`REDIS_TIMEOUT_S`, so the event loop never waits on either.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway import metrics
from mss.config import ResponseCacheStore

log = logging.getLogger(__name__)

Clock = Callable[[], float]
T = TypeVar("T")

KEY_BYTES = 32
"""Length of a storage key (blake2b digest); counted in each entry's size."""
REDIS_PREFIX = b"mss:rc:"
"""Prefix of every Redis key the cache writes, so a shared server's other keys are apart."""
REDIS_TIMEOUT_S = 0.5
"""Bound on connecting to Redis and on each command; past it the lookup is a miss."""
REDIS_RETRY_FIRST_S = 0.5
"""Wait before the first ping of a Redis found down; doubled after each failed ping."""
REDIS_RETRY_MAX_S = 30.0
SQLITE_BUSY_TIMEOUT_S = 1.0
"""How long a write waits for another process's write to the same file."""
EVICT_BATCH = 128
"""Rows read per step when the SQLite tier deletes its least recently used rows."""
LARGEST_SHARE = 8
"""An entry over 1/LARGEST_SHARE of a tier's bound is not kept in that tier."""


def storage_key(model: str, key: bytes) -> bytes:
    """The key every tier stores under: blake2b-256 of the model name and the caller's key.

    The model goes in too, so two models never share an entry even if a caller's key
    left it out; model names cannot hold NUL (`Deployment.name`), which separates them.
    """
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    digest.update(model.encode())
    digest.update(b"\0")
    digest.update(key)
    return digest.digest()


class _Outage:
    """How a second tier's failures show: each counted, a warning when it starts failing,
    one line when it works again; failures in between only at debug level."""

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.errors = metrics.CACHE_ERRORS.labels(tier)
        self.since: float | None = None
        """Monotonic time of the first failure in a row; None while the tier works."""

    def failed(self, what: str, exc: BaseException) -> None:
        self.errors.inc()
        if self.since is None:
            self.since = time.monotonic()
            log.warning(
                "response cache: %s %s failed (%s: %s); taken as a miss, caching in memory "
                "until it works",
                self.tier,
                what,
                type(exc).__name__,
                exc,
            )
        else:
            log.debug("response cache: %s %s failed again: %r", self.tier, what, exc)

    def ok(self) -> None:
        if self.since is not None:
            down_s = time.monotonic() - self.since
            self.since = None
            log.info("response cache: %s works again after %.1f s", self.tier, down_s)


@dataclass(slots=True)
class _Entry:
    value: bytes
    expires: float
    """On the memory tier's clock."""
    size: int


class MemoryTier:
    """Entries of one process, least recently used first, within `max_bytes` of key and value.

    No awaits inside, so no lock: each call runs whole on the event loop.
    """

    name = "memory"

    def __init__(self, max_bytes: int, clock: Clock) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._evictions = metrics.CACHE_EVICTIONS.labels(self.name)
        self._gauge = metrics.CACHE_BYTES.labels(self.name)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._drop(key)
            self._gauge.set(self.bytes)
            return None
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: bytes, value: bytes, ttl_s: float) -> None:
        """Keep `value` for `ttl_s` seconds, unless it is over an eighth of the bound."""
        if key in self._entries:
            self._drop(key)  # also when the new value is not kept: never answer the old one
        size = len(key) + len(value)
        if ttl_s <= 0 or size * LARGEST_SHARE > self.max_bytes:
            self._gauge.set(self.bytes)
            return
        self._entries[key] = _Entry(value, self._clock() + ttl_s, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            expired = self._entries[oldest].expires <= self._clock()
            self._drop(oldest)
            if not expired:
                self._evictions.inc()
        self._gauge.set(self.bytes)

    def _drop(self, key: bytes) -> None:
        self.bytes -= self._entries.pop(key).size


class SecondTier(Protocol):
    """The tier behind memory: SQLite or Redis. Its methods never raise for its own
    failures (they count and log them, and answer a miss)."""

    name: str

    async def start(self) -> None: ...

    async def get(self, key: bytes) -> tuple[bytes, float] | None:
        """The value and the seconds it has left, or None."""

    async def put(self, key: bytes, value: bytes, ttl_s: float) -> None: ...

    async def close(self) -> None: ...


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS response_cache (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    expires_unix REAL NOT NULL,
    size INTEGER NOT NULL,
    used_unix REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS response_cache_used ON response_cache (used_unix);
CREATE INDEX IF NOT EXISTS response_cache_expires ON response_cache (expires_unix);
CREATE TABLE IF NOT EXISTS response_cache_total (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO response_cache_total VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS response_cache_added AFTER INSERT ON response_cache BEGIN
    UPDATE response_cache_total SET bytes = bytes + new.size;
END;
CREATE TRIGGER IF NOT EXISTS response_cache_removed AFTER DELETE ON response_cache BEGIN
    UPDATE response_cache_total SET bytes = bytes - old.size;
END;
CREATE TRIGGER IF NOT EXISTS response_cache_resized AFTER UPDATE OF size ON response_cache BEGIN
    UPDATE response_cache_total SET bytes = bytes - old.size + new.size;
END;
"""
"""Entries, and their total size in one row that triggers keep exact, so checking the bound
costs one read whichever process wrote. Writes are upserts, never INSERT OR REPLACE, whose
implicit delete would not fire the trigger."""


class SqliteTier:
    """A SQLite file of entries that outlive the process, shared by the gateway workers of
    one machine (WAL: readers never wait for the writer).

    One connection, used only by one thread of its own, so calls are serialised without a
    lock and the event loop only awaits them. Bounded by `max_bytes` of key and value:
    a write that passes it deletes expired rows, then the least recently used ones.
    """

    name = "sqlite"

    def __init__(self, path: str, max_bytes: int, wall_clock: Clock) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._wall = wall_clock
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="response-cache-sqlite")
        self._outage = _Outage(self.name)
        self._evictions = metrics.CACHE_EVICTIONS.labels(self.name)

    async def start(self) -> None:
        try:
            await self._call(self._open)
        except (sqlite3.Error, OSError) as exc:
            self._outage.errors.inc()
            log.error(
                "response cache: cannot open SQLite file %s (%s: %s); caching in memory only",
                self.path,
                type(exc).__name__,
                exc,
            )
            await self._call(self._close)

    async def get(self, key: bytes) -> tuple[bytes, float] | None:
        if self._db is None:
            return None
        try:
            found = await self._call(self._get, key, self._wall())
        except sqlite3.Error as exc:
            self._outage.failed("read", exc)
            return None
        self._outage.ok()
        return found

    async def put(self, key: bytes, value: bytes, ttl_s: float) -> None:
        size = len(key) + len(value)
        if self._db is None or ttl_s <= 0 or size * LARGEST_SHARE > self.max_bytes:
            return
        try:
            evicted = await self._call(self._put, key, value, size, ttl_s, self._wall())
        except sqlite3.Error as exc:
            self._outage.failed("write", exc)
            return
        self._outage.ok()
        if evicted:
            self._evictions.inc(evicted)

    async def close(self) -> None:
        await self._call(self._close)
        self._thread.shutdown(wait=False)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # Everything below runs in the tier's thread.

    def _open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit (isolation_level None): transactions are the explicit BEGINs below.
        db = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # a cache may lose its last writes on power loss
        try:
            # One transaction, so workers starting together see all of it or none.
            db.executescript(f"BEGIN IMMEDIATE;\n{_SQLITE_SCHEMA}\nCOMMIT;")
            db.execute("DELETE FROM response_cache WHERE expires_unix <= ?", (self._wall(),))
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _get(self, key: bytes, now: float) -> tuple[bytes, float] | None:
        db = self._connection()
        row = db.execute(
            "SELECT value, expires_unix FROM response_cache WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        value, expires = row
        if expires <= now:
            db.execute("DELETE FROM response_cache WHERE key = ? AND expires_unix <= ?", (key, now))
            return None
        db.execute("UPDATE response_cache SET used_unix = ? WHERE key = ?", (now, key))
        return bytes(value), expires - now

    def _put(self, key: bytes, value: bytes, size: int, ttl_s: float, now: float) -> int:
        """Write the entry and keep the bound; the number of rows evicted to keep it."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO response_cache (key, value, expires_unix, size, used_unix) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                "expires_unix = excluded.expires_unix, size = excluded.size, "
                "used_unix = excluded.used_unix",
                (key, value, now + ttl_s, size, now),
            )
            evicted = self._evict(db, now)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return evicted

    def _evict(self, db: sqlite3.Connection, now: float) -> int:
        if self._total(db) <= self.max_bytes:
            return 0
        db.execute("DELETE FROM response_cache WHERE expires_unix <= ?", (now,))
        evicted = 0
        total = self._total(db)
        while total > self.max_bytes:
            rows = db.execute(
                "SELECT key, size FROM response_cache ORDER BY used_unix LIMIT ?", (EVICT_BATCH,)
            ).fetchall()
            if not rows:
                break
            doomed = []
            for key, size in rows:
                if total <= self.max_bytes:
                    break
                doomed.append((key,))
                total -= size
            db.executemany("DELETE FROM response_cache WHERE key = ?", doomed)
            evicted += len(doomed)
        return evicted

    @staticmethod
    def _total(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT bytes FROM response_cache_total").fetchone()[0])

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError("the response cache's SQLite file is closed")
        return self._db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
"""What a Redis call may raise when the server is down, slow or refusing; all are misses."""


class RedisTier:
    """A Redis server shared by several gateways: `SET key value PX ttl`, `GET` with `PTTL`.

    Each command is bounded by `REDIS_TIMEOUT_S`, a retry included. A
    failure marks the server down: lookups skip it (memory only) while a background
    task pings it with backoff, and the first answer puts it back in use.
    """

    name = "redis"

    def __init__(self, url: str) -> None:
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            # One immediate reconnect mends a connection the server closed; a server that
            # is down refuses both at once, and REDIS_TIMEOUT_S bounds the pair.
            retry=Retry(NoBackoff(), 1),
        )
        self.up = False
        """False until the first ping answers, and from a failure until a ping answers."""
        self._outage = _Outage(self.name)
        self._reconnect: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                await self._client.ping()
        except _REDIS_ERRORS as exc:
            self._down("connect", exc)
            return
        self.up = True

    async def get(self, key: bytes) -> tuple[bytes, float] | None:
        if not self.up:
            return None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.get(REDIS_PREFIX + key)
                    pipe.pttl(REDIS_PREFIX + key)
                    value, pttl_ms = await pipe.execute()
        except _REDIS_ERRORS as exc:
            self._down("GET", exc)
            return None
        if value is None or pttl_ms <= 0:  # gone, or set by hand without an expiry
            return None
        return bytes(value), pttl_ms / 1000

    async def put(self, key: bytes, value: bytes, ttl_s: float) -> None:
        ttl_ms = int(ttl_s * 1000)
        if not self.up or ttl_ms <= 0:
            return
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                await self._client.set(REDIS_PREFIX + key, value, px=ttl_ms)
        except _REDIS_ERRORS as exc:
            self._down("SET", exc)

    async def close(self) -> None:
        if self._reconnect is not None:
            self._reconnect.cancel()
            await asyncio.gather(self._reconnect, return_exceptions=True)
        await self._client.aclose()

    def _down(self, what: str, exc: BaseException) -> None:
        self._outage.failed(what, exc)
        self.up = False
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.create_task(self._ping_until_up(), name="redis-reconnect")

    async def _ping_until_up(self) -> None:
        delay = REDIS_RETRY_FIRST_S
        while True:
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    await self._client.ping()
            except _REDIS_ERRORS as exc:
                self._outage.failed("connect", exc)
                delay = min(delay * 2, REDIS_RETRY_MAX_S)
                continue
            self.up = True
            self._outage.ok()
            return


@dataclass(slots=True)
class _ModelCounters:
    """Children bound once per model, so a lookup does no label lookups."""

    hits: dict[str, Counter]
    """By tier name."""
    misses: Counter


class ResponseCache:
    """The gateway's response cache: memory first, then the configured second tier.

    `clock` (monotonic) times the memory tier; `wall_clock` the second tier, whose
    entries outlive the process. Both are for tests to replace. Calls before `start`
    or after `close` use memory only.
    """

    def __init__(
        self,
        settings: ResponseCacheStore,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.memory = MemoryTier(settings.max_bytes, clock)
        self.second: SecondTier | None = None
        if settings.sqlite_path is not None:
            self.second = SqliteTier(settings.sqlite_path, settings.sqlite_max_bytes, wall_clock)
        elif settings.redis_url is not None:
            self.second = RedisTier(settings.redis_url)
        self._started = False
        self._models: dict[str, _ModelCounters] = {}

    async def start(self) -> None:
        """Open the SQLite file or connect to Redis; neither failing stops the gateway."""
        if self.second is not None:
            await self.second.start()
            self._started = True

    async def get(self, model: str, key: bytes) -> bytes | None:
        """The cached response for `key` of `model`, or None (counted as a hit or a miss)."""
        counters = self._counters(model)
        skey = storage_key(model, key)
        value = self.memory.get(skey)
        if value is not None:
            counters.hits[MemoryTier.name].inc()
            return value
        if self._started and self.second is not None:
            found = await self.second.get(skey)
            if found is not None:
                value, left_s = found
                self.memory.put(skey, value, left_s)
                counters.hits[self.second.name].inc()
                return value
        counters.misses.inc()
        return None

    async def put(self, model: str, key: bytes, value: bytes, ttl_s: float) -> None:
        """Keep `value` for `ttl_s` seconds in memory and in the second tier (write-through).

        A second tier that fails is logged and counted, never raised.
        """
        if ttl_s <= 0:
            return
        skey = storage_key(model, key)
        self.memory.put(skey, value, ttl_s)
        if self._started and self.second is not None:
            await self.second.put(skey, value, ttl_s)

    async def close(self) -> None:
        """Close the second tier (memory stays usable until the object goes)."""
        if self._started and self.second is not None:
            self._started = False
            await self.second.close()

    def _counters(self, model: str) -> _ModelCounters:
        found = self._models.get(model)
        if found is None:
            tiers = [MemoryTier.name] + ([self.second.name] if self.second else [])
            found = self._models[model] = _ModelCounters(
                hits={tier: metrics.CACHE_HITS.labels(model, tier) for tier in tiers},
                misses=metrics.CACHE_MISSES.labels(model),
            )
        return found
