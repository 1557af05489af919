"""Requests held while an autoscaled model has no ready replica (scaled to zero, or starting).

Such a request is not refused: `ColdStarts.hold` keeps it in the model's queue,
in arrival order, and tells the load reporter at once so the controller starts
a replica without waiting for the next report. Once a replica is in rotation
the queue is let go in arrival order, no more at once than the ready replicas
admit (`max_in_flight` from their Health); the rest follow as those finish.
While any request of the model is still held, new ones queue behind it.

Bounds: no more held than the model's `max_queue`, none longer than its
`cold_start_timeout_s`; past either, 503 with Retry-After. When the controller
says no replica can serve soon (one failed to start, no room to place one),
every held request ends with a 503 naming the reason.

A streaming request held longer than `keepalive_s` gets its 200 and SSE comment
lines (`: waiting for a replica`) every `keepalive_s`, so proxies keep the
connection; from then on a failure ends the stream with an error event (the
status line is gone) carrying the same 503 and message.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import metrics
from gateway.errors import ApiError
from gateway.routing_table import ModelRouter, RoutingTable
from gateway.sse import StreamFormat

log = logging.getLogger(__name__)

KEEPALIVE = b": waiting for a replica\n\n"
RETRY_AFTER_S = 5.0
"""Retry-After of a request refused during a cold start: a replica takes seconds to start."""
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class HoldAbandoned(Exception):
    """The client left while its request was held."""


@dataclass(eq=False, slots=True)
class _Queue:
    """One model's held requests, oldest first, and those let go but not yet finished."""

    model: str
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    dispatched: int = 0
    pump: asyncio.Task[None] | None = None

    def held(self) -> int:
        """Requests waiting (those that left or timed out may still sit in the deque)."""
        return sum(1 for waiter in self.waiters if not waiter.done())

    def fail(self, exc: ApiError) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)


@dataclass(eq=False, slots=True)
class Hold:
    """A request that was held: the `send` to answer it with, and its dispatch slot."""

    queue: _Queue
    raw_send: Any
    fmt: StreamFormat | None
    request_id: str
    waiter: asyncio.Future[None]
    timeout_s: float
    keepalive_s: float
    started: float
    """Loop time the request was held."""
    opened: bool = False
    """The 200 and keep-alive comments went out: the answer is now a stream."""
    released: bool = False
    dispatched: bool = False

    async def wait(self, receive: Any) -> None:
        """Until the request may go to a replica; raises ApiError (503) or HoldAbandoned."""
        loop = asyncio.get_running_loop()
        name, waiter, started = self.queue.model, self.waiter, self.started
        gone = asyncio.ensure_future(_disconnect(receive))
        metrics.HELD.labels(name).inc()
        try:
            keepalives = 0
            while not waiter.done():
                now = loop.time()
                if now - started >= self.timeout_s:
                    raise ApiError(
                        503,
                        f"model {name!r} has no ready replica after {self.timeout_s:g} s "
                        "(cold start timeout); retry later",
                        code="cold_start_timeout",
                        retry_after=RETRY_AFTER_S,
                    )
                wake = started + self.timeout_s
                if self.fmt is not None:
                    due = started + self.keepalive_s * (keepalives + 1)
                    if now >= due:
                        await self.keepalive()
                        keepalives += 1
                        continue
                    wake = min(wake, due)
                await asyncio.wait(
                    {waiter, gone},
                    timeout=max(0.0, wake - now),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if gone.done():
                    raise HoldAbandoned
            waiter.result()  # the reason no replica will come, when there is one
            if gone.done():
                raise HoldAbandoned
            self.dispatched = True
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.queue.dispatched -= 1  # let go as we left: the slot passes on
            waiter.cancel()
            raise
        finally:
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
            metrics.HELD.labels(name).dec()
            metrics.HOLD_SECONDS.labels(name).observe(loop.time() - started)

    async def send(self, message: dict[str, Any]) -> None:
        """The ASGI send for the rest of the request: its own 200 went out already."""
        if self.opened and message["type"] == "http.response.start":
            return
        await self.raw_send(message)

    async def keepalive(self) -> None:
        if not self.opened:
            headers = [*SSE_HEADERS, (b"x-request-id", self.request_id.encode())]
            await self.raw_send({"type": "http.response.start", "status": 200, "headers": headers})
            self.opened = True
        await self.raw_send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})

    async def fail(self, exc: ApiError) -> None:
        """End a stream that was opened while held with `exc` as its error event."""
        assert self.fmt is not None
        body = self.fmt.error(exc.message, exc.status)
        await self.raw_send({"type": "http.response.body", "body": body, "more_body": False})

    def done(self) -> None:
        """The request is over: its dispatch slot goes to the next held request."""
        if self.dispatched and not self.released:
            self.released = True
            self.queue.dispatched -= 1


class ColdStarts:
    """The held requests of every autoscaled model at this gateway process."""

    def __init__(
        self,
        table: RoutingTable,
        keepalive_s: float,
        on_held: Callable[[], None] = lambda: None,
        poll_s: float = 0.05,
    ) -> None:
        self.table = table
        self.keepalive_s = keepalive_s
        self.on_held = on_held
        """Called when a request is held: the load reporter reports at once."""
        self.poll_s = poll_s
        self._queues: dict[str, _Queue] = {}

    def held(self, model: str) -> int:
        queue = self._queues.get(model)
        return queue.held() if queue is not None else 0

    def needs_hold(self, router: ModelRouter) -> bool:
        """True for an autoscaled model with no ready replica, or with requests held already."""
        if not router.autoscaled:
            return False
        queue = self._queues.get(router.name)
        return not router.ready() or (queue is not None and bool(queue.waiters))

    def enter(self, router: ModelRouter, send: Any, fmt: StreamFormat | None, rid: str) -> Hold:
        """Hold a request (then `await hold.wait(receive)`); raises ApiError (503) when the
        controller says no replica will come soon or the model holds `max_queue` already.

        `fmt` is the stream's format for a streaming request (keep-alives and the
        error event), None for one answered as a whole body.
        """
        name = router.name
        if router.unavailable and not router.ready():
            raise ApiError(
                503,
                f"model {name!r} has no replica to serve it: {router.unavailable}; retry later",
                code="no_replica",
                retry_after=RETRY_AFTER_S,
            )
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(name)
        if queue.held() >= router.admission.max_queue:
            raise ApiError(
                503,
                f"model {name!r} is starting a replica and holds {queue.held()} requests "
                "already; retry later",
                code="capacity",
                retry_after=RETRY_AFTER_S,
            )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        queue.waiters.append(waiter)
        if queue.pump is None or queue.pump.done():
            queue.pump = asyncio.create_task(self._pump(queue), name=f"cold-start-{name}")
        self.on_held()
        return Hold(
            queue,
            send,
            fmt,
            rid,
            waiter=waiter,
            timeout_s=router.cold_start_timeout_s,
            keepalive_s=self.keepalive_s,
            started=loop.time(),
        )

    async def _pump(self, queue: _Queue) -> None:
        """Let held requests go as replicas become ready, until none is held."""
        while queue.waiters:
            router = self.table.get(queue.model)
            if router is None:
                queue.fail(ApiError(404, f"model {queue.model!r} was removed", code="no_model"))
            elif router.ready():
                self._release(router, queue)
            elif router.unavailable:
                log.warning(
                    "model %s: ending %d held requests: %s",
                    queue.model,
                    len(queue.waiters),
                    router.unavailable,
                )
                queue.fail(
                    ApiError(
                        503,
                        f"model {queue.model!r} has no replica to serve it: "
                        f"{router.unavailable}; retry later",
                        code="no_replica",
                        retry_after=RETRY_AFTER_S,
                    )
                )
            while queue.waiters and queue.waiters[0].done():
                queue.waiters.popleft()  # left, or timed out
            await asyncio.sleep(self.poll_s)

    @staticmethod
    def _release(router: ModelRouter, queue: _Queue) -> None:
        """Let go, oldest first, as many as the ready replicas admit beyond those let go."""
        room = -queue.dispatched
        for client in router.clients.values():
            stats = client.stats
            if stats.healthy and not stats.removed:
                room += stats.max_in_flight or router.admission.max_in_flight
        while room > 0 and queue.waiters:
            waiter = queue.waiters.popleft()
            if waiter.done():
                continue
            waiter.set_result(None)
            queue.dispatched += 1
            room -= 1


async def _disconnect(receive: Any) -> None:
    """Returns when the client disconnects (the body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
