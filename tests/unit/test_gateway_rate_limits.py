"""Per-key limits on a fake clock: bursts and refill, token budgets, concurrency, headers."""

from __future__ import annotations

import pytest

from gateway.rate_limits import KeyLimiter, TokenBucket, format_duration
from mss.config import ApiKey

HASH = "0" * 64


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(clock: FakeClock, **limits: float) -> KeyLimiter:
    return KeyLimiter(ApiKey.model_validate({"id": "team-a", "sha256": HASH, **limits}), clock)


def test_bucket_takes_a_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(0.0) == pytest.approx(0.5)
    assert not bucket.take(0.4)
    assert bucket.take(0.5)
    assert bucket.available(100.0) == 3  # never above its capacity
    assert bucket.until_full(100.0) == 0


def test_bucket_charge_may_overdraw_and_is_paid_back_over_time() -> None:
    bucket = TokenBucket(rate=10.0, capacity=100, now=0.0)
    bucket.charge(0.0, 150)
    assert bucket.available(0.0) == -50
    assert bucket.wait(0.0) == pytest.approx(5.1)  # until it holds one token again
    assert bucket.until_full(0.0) == pytest.approx(15.0)
    assert not bucket.take(5.0)
    assert bucket.available(5.0) == pytest.approx(0.0)


def test_bucket_resize_keeps_what_it_holds_up_to_the_new_capacity() -> None:
    bucket = TokenBucket(rate=1.0, capacity=10, now=0.0)
    assert bucket.take(0.0, 4)
    bucket.resize(rate=5.0, capacity=3, now=0.0)
    assert bucket.available(0.0) == 3
    bucket.resize(rate=5.0, capacity=20, now=0.0)
    assert bucket.available(0.0) == 3 and bucket.available(1.0) == 8


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.0004, "1ms"),
        (0.25, "250ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.999, "59.999s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (90.25, "1m30.25s"),
        (3723, "1h2m3s"),
    ],
)
def test_durations_are_written_as_openai_does(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_no_limits_admits_everything_and_sends_no_headers() -> None:
    clock = FakeClock()
    key = limiter(clock)
    assert all(key.admit() is None for _ in range(1000))
    assert key.in_flight == 1000 and key.headers() == []


def test_requests_per_second_allow_a_burst_then_refuse_until_refilled() -> None:
    clock = FakeClock()
    key = limiter(clock, rps=2, burst=4)
    for _ in range(4):
        assert key.admit() is None
        key.finish(0)
    refusal = key.admit()
    assert refusal is not None and refusal.kind == "requests"
    assert refusal.retry_after == 1  # 0.5 s rounded up to whole seconds
    assert "2 requests per second" in refusal.message and "500ms" in refusal.message
    clock.advance(0.5)
    assert key.admit() is None
    assert key.admit() is not None  # the refill was one request, now taken


def test_burst_defaults_to_the_rate_rounded_up() -> None:
    clock = FakeClock()
    key = limiter(clock, rps=2.5)
    assert [key.admit() is None for _ in range(4)] == [True, True, True, False]


def test_output_tokens_are_charged_at_the_end_and_refuse_while_overdrawn() -> None:
    clock = FakeClock()
    key = limiter(clock, tokens_per_minute=600)  # 10 tokens a second
    assert key.admit() is None
    assert key.admit() is None  # the budget is only checked, not taken, at admission
    key.finish(500)
    assert key.admit() is None  # 100 left
    key.finish(400)
    key.finish(0)
    refusal = key.admit()  # 300 overdrawn: 30.1 s until a token is back
    assert refusal is not None and refusal.kind == "tokens" and refusal.retry_after == 31
    assert "600 output tokens per minute" in refusal.message
    clock.advance(30)
    assert key.admit() is not None
    clock.advance(0.2)
    assert key.admit() is None


def test_concurrent_requests_are_bounded_and_given_back() -> None:
    clock = FakeClock()
    key = limiter(clock, max_streams=2)
    assert key.admit() is None and key.admit() is None
    refusal = key.admit()
    assert refusal is not None and refusal.kind == "streams" and refusal.retry_after == 1
    key.finish(0)
    assert key.admit() is None
    assert key.in_flight == 2


def test_a_refused_request_takes_nothing() -> None:
    clock = FakeClock()
    key = limiter(clock, rps=1, burst=1, max_streams=1)
    assert key.admit() is None
    refusal = key.admit()  # at its concurrency limit: the rps bucket is not touched either
    assert refusal is not None and refusal.kind == "streams"
    key.finish(0)
    assert key.in_flight == 0
    clock.advance(1)
    assert key.admit() is None


def test_headers_say_the_limits_what_remains_and_when_all_is_back() -> None:
    clock = FakeClock()
    key = limiter(clock, rps=2, burst=10, tokens_per_minute=6000)
    assert key.admit() is None
    assert key.admit() is None
    key.finish(1500)
    assert dict(key.headers()) == {
        b"x-ratelimit-limit-requests": b"10",
        b"x-ratelimit-remaining-requests": b"8",
        b"x-ratelimit-reset-requests": b"1s",
        b"x-ratelimit-limit-tokens": b"6000",
        b"x-ratelimit-remaining-tokens": b"4500",
        b"x-ratelimit-reset-tokens": b"15s",
    }
    key.finish(6000)  # overdrawn: nothing remains, and it is back in a minute and a quarter
    headers = dict(key.headers())
    assert headers[b"x-ratelimit-remaining-tokens"] == b"0"
    assert headers[b"x-ratelimit-reset-tokens"] == b"1m15s"


def test_new_limits_keep_the_usage_so_far() -> None:
    clock = FakeClock()
    key = limiter(clock, rps=1, burst=5)
    for _ in range(5):
        assert key.admit() is None
    key.configure(ApiKey(id="team-a", sha256=HASH, rps=1, burst=10, max_streams=5))
    refusal = key.admit()
    assert refusal is not None and refusal.kind == "streams"
    key.configure(ApiKey(id="team-a", sha256=HASH, rps=1, burst=10))
    assert key.admit() is not None and key.admit().kind == "requests"  # type: ignore[union-attr]
    key.configure(ApiKey(id="team-a", sha256=HASH))
    assert key.admit() is None and key.headers() == []
