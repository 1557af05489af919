"""Per-key limits: requests per second, output tokens per minute, concurrent requests.

Pure logic on an injected clock (seconds, monotonic), so tests step time by hand:

- requests per second: a token bucket of `burst` requests refilled at `rps`;
  a request takes one or is refused;
- output tokens per minute: a bucket of `tokens_per_minute` refilled
  continuously at a minute's budget per minute (not a sliding window: no
  per-request history is kept). Tokens are known only when a request ends,
  so they are charged then and may overdraw the bucket; new requests are
  refused while it holds less than one token, i.e. until the overdraft is
  paid back;
- concurrent requests: a counter bounded by `max_streams`.

`KeyLimiter.headers` gives OpenAI's `x-ratelimit-*` values for the limits a key has.
Every count is this gateway process's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from mss.config import ApiKey

Clock = Callable[[], float]

STREAMS_RETRY_AFTER_S = 1.0
"""When a stream will end is unknown: a client at its concurrency limit retries after this."""
LIMIT_KINDS = ("requests", "tokens", "streams")
"""What a refusal can be for: the `limit` label of `mss_gateway_key_rejections_total`."""


class TokenBucket:
    """`capacity` units, refilled at `rate` per second; starts full.

    `take` removes units only when they are there; `charge` always removes
    them and may leave the bucket in debt (a negative level).
    """

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def resize(self, rate: float, capacity: float, now: float) -> None:
        """New bounds (a reloaded key); what the bucket holds is kept, up to the new capacity."""
        self._refill(now)
        self.rate = rate
        self.capacity = capacity
        self.level = min(self.level, capacity)

    def available(self, now: float) -> float:
        self._refill(now)
        return self.level

    def take(self, now: float, amount: float = 1.0) -> bool:
        self._refill(now)
        if self.level < amount:
            return False
        self.level -= amount
        return True

    def charge(self, now: float, amount: float) -> None:
        self._refill(now)
        self.level -= amount

    def wait(self, now: float, amount: float = 1.0) -> float:
        """Seconds until the bucket holds `amount` (0 when it does)."""
        self._refill(now)
        return max(0.0, (amount - self.level) / self.rate)

    def until_full(self, now: float) -> float:
        self._refill(now)
        return (self.capacity - self.level) / self.rate


def format_duration(seconds: float) -> str:
    """A wait as OpenAI's `x-ratelimit-reset-*` headers write it: `0s`, `250ms`, `1.5s`, `6m0s`."""
    ms = math.ceil(seconds * 1000 - 1e-6)  # float noise must not add a millisecond
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    text = f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if minutes or hours:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a key's request is refused, and when to retry."""

    kind: str
    """One of LIMIT_KINDS."""
    retry_after: float
    """Seconds, rounded up to a whole second so a client that waits that long is let in."""
    message: str


class KeyLimiter:
    """The limits of one API key and what it has used, at this gateway process.

    A request calls `admit` once; when admitted, `finish` once when it ends
    (in `finally`), with the output tokens to charge.
    """

    def __init__(self, key: ApiKey, clock: Clock) -> None:
        self.clock = clock
        self.key = key
        self.in_flight = 0
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.configure(key)

    @property
    def id(self) -> str:
        return self.key.id

    def configure(self, key: ApiKey) -> None:
        """Take `key`'s limits (at start, or when the keys file changed); usage so far is kept."""
        now = self.clock()
        self.key = key
        if key.rps is None:
            self.requests = None
        else:
            burst = key.burst or max(1, math.ceil(key.rps))
            self.requests = _bucket(self.requests, key.rps, burst, now)
        if key.tokens_per_minute is None:
            self.tokens = None
        else:
            tpm = key.tokens_per_minute
            self.tokens = _bucket(self.tokens, tpm / 60.0, tpm, now)

    def admit(self) -> Refusal | None:
        """Count a new request in, or say which limit refuses it (nothing is taken then)."""
        now = self.clock()
        key = self.key
        if key.max_streams is not None and self.in_flight >= key.max_streams:
            return Refusal(
                "streams",
                STREAMS_RETRY_AFTER_S,
                f"API key {key.id!r} has {self.in_flight} requests in progress, "
                f"its limit; retry when one ends",
            )
        tokens = self.tokens
        if tokens is not None and tokens.available(now) < 1:
            return Refusal(
                "tokens",
                math.ceil(tokens.wait(now)),
                f"API key {key.id!r} used its {key.tokens_per_minute} output tokens per minute; "
                f"retry in {format_duration(tokens.wait(now))}",
            )
        requests = self.requests
        if requests is not None and not requests.take(now):
            return Refusal(
                "requests",
                math.ceil(requests.wait(now)),
                f"API key {key.id!r} is over its {key.rps:g} requests per second; "
                f"retry in {format_duration(requests.wait(now))}",
            )
        self.in_flight += 1
        return None

    def finish(self, output_tokens: int) -> None:
        """An admitted request ended having produced `output_tokens`."""
        self.in_flight -= 1
        if self.tokens is not None and output_tokens > 0:
            self.tokens.charge(self.clock(), output_tokens)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI's `x-ratelimit-*` headers for the limits this key has, as of now."""
        now = self.clock()
        out: list[tuple[bytes, bytes]] = []
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            remaining = max(0, math.floor(bucket.available(now)))
            reset = format_duration(bucket.until_full(now))
            out.append((b"x-ratelimit-limit-" + kind.encode(), b"%d" % bucket.capacity))
            out.append((b"x-ratelimit-remaining-" + kind.encode(), b"%d" % remaining))
            out.append((b"x-ratelimit-reset-" + kind.encode(), reset.encode()))
        return out


def _bucket(old: TokenBucket | None, rate: float, capacity: float, now: float) -> TokenBucket:
    if old is None:
        return TokenBucket(rate, capacity, now)
    old.resize(rate, capacity, now)
    return old
