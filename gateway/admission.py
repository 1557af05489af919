"""Admission control: a bounded number of streams per model, a bounded queue, then refusal.

`ModelAdmission.acquire` is O(1): a free slot is taken at once; otherwise the
request waits in a FIFO queue while there is room; past that it is refused
immediately with 503 and Retry-After, never left in an unbounded queue.
`ClientLimiter` bounds one client's concurrent requests (429).

Slots are released in `finally` by the caller; a waiter cancelled in the queue
gives back its place.
"""

from __future__ import annotations

import asyncio
from collections import deque

from gateway.errors import ApiError

RETRY_AFTER_S = 1.0


class ModelAdmission:
    """In-flight and queue bounds of one model at this gateway process."""

    def __init__(self, model: str, max_in_flight: int, max_queue: int) -> None:
        self.model = model
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.queued = 0

    def resize(self, max_in_flight: int, max_queue: int) -> None:
        """New bounds from a routing table; waiters move in if slots opened."""
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        while self.in_flight < self.max_in_flight and self._wake_next():
            self.in_flight += 1

    def try_acquire(self) -> bool:
        """Take a slot now if one is free and nobody waits before us."""
        if self.in_flight < self.max_in_flight and not self.queued:
            self.in_flight += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if there is room; else raise a 503 ApiError."""
        if self.try_acquire():
            return
        if self.queued >= self.max_queue:
            raise ApiError(
                503,
                f"model {self.model!r} is at capacity ({self.in_flight} streaming, "
                f"{self.queued} queued); retry later",
                code="capacity",
                retry_after=RETRY_AFTER_S,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.queued += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed to us as we were cancelled: pass it on.
                self.release()
            raise
        finally:
            self.queued -= 1

    def _wake_next(self) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False

    def release(self) -> None:
        """Give a slot back: to the first live waiter, else to the pool."""
        if self.in_flight <= self.max_in_flight and self._wake_next():
            return
        self.in_flight -= 1


class ClientLimiter:
    """At most `limit` concurrent requests per client key (API key or address); 0 is off."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, client: str) -> None:
        if not self.limit:
            return
        count = self._counts.get(client, 0)
        if count >= self.limit:
            raise ApiError(
                429,
                f"too many concurrent requests from this client (limit {self.limit}); retry later",
                code="rate_limited",
                retry_after=RETRY_AFTER_S,
            )
        self._counts[client] = count + 1

    def release(self, client: str) -> None:
        if not self.limit:
            return
        count = self._counts.get(client, 0) - 1
        if count > 0:
            self._counts[client] = count
        else:
            self._counts.pop(client, None)
