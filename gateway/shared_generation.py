"""Deterministic requests: answered from the response cache, or sharing one generation.

A request is deterministic when it samples greedily (temperature 0) or names a
seed: the same model, prompt and sampling give the same output, so a second
identical request need not reach a replica. Where its deployment enables them:

- The response cache (`gateway.response_cache`) keeps the replica's deltas of
  a finished generation under a key over the model and the whole wire request;
  a hit replays them through the route's own formatter (`replay_sink`), so it
  reads as a normal stream or JSON body, marked `x-cache: HIT`.
- Coalescing: a request identical to one in flight attaches to its
  `SharedGeneration` and receives every delta from the start. The generation
  belongs to all its clients: one leaving stops nothing for the others, the
  last one leaving aborts it on the replica.

A cacheable request runs as a `SharedGeneration` even when coalescing is off
(then no one else joins it): the generation's task records the deltas once
and stores them when it ends well, whichever client is still reading.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway import metrics
from gateway.api_models import GenerationInput
from gateway.errors import ApiError
from gateway.replica_client import Output, RequestSink
from gateway.request_flow import ClientGone, Flow, Lease, request_charge
from gateway.response_cache import ResponseCache
from gateway.sse import StreamFormat
from protos import replica_pb2

if TYPE_CHECKING:
    from gateway.generation import GenerationService
    from gateway.routing_table import ModelRouter

log = logging.getLogger(__name__)

CACHE_HEADER = b"x-cache"


def deterministic(sampling: replica_pb2.SamplingParams) -> bool:
    """Whether the same request always gives the same output: greedy, or seeded."""
    greedy = sampling.HasField("temperature") and sampling.temperature == 0.0
    return greedy or sampling.HasField("seed")


def request_key(model: str, request: replica_pb2.GenerateRequest) -> bytes:
    """The cache key of a wire request: its model and every field but its id."""
    keyed = replica_pb2.GenerateRequest()
    keyed.CopyFrom(request)
    keyed.request_id = ""
    digest = hashlib.blake2b(model.encode(), digest_size=32)
    digest.update(b"\0")
    digest.update(keyed.SerializeToString(deterministic=True))
    return digest.digest()


def cache_directives(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bool, bool]:
    """(read, write): what the request's `Cache-Control` allows the response cache.

    `no-cache` (or `max-age=0`) asks for a fresh answer, which is then stored;
    `no-store` keeps the cache out of the request entirely.
    """
    read = write = True
    for name, value in headers:
        if name != b"cache-control":
            continue
        for directive in value.lower().split(b","):
            directive = directive.strip().replace(b" ", b"")
            if directive == b"no-store":
                read = write = False
            elif directive in (b"no-cache", b"max-age=0"):
                read = False
    return read, write


def encode(deltas: Sequence[replica_pb2.RequestDelta]) -> bytes:
    return replica_pb2.GenerateReply(deltas=deltas).SerializeToString()


class _Detached:
    """The stream of a sink that no replica feeds: cancelling it is the owner's business."""

    def __init__(self, on_cancel: Callable[[str], None] | None = None) -> None:
        self._on_cancel = on_cancel

    def cancel(self, request_id: str) -> None:
        if self._on_cancel is not None:
            self._on_cancel(request_id)


def replay_sink(value: bytes, request_id: str, choices: int) -> RequestSink | None:
    """A sink holding a cached generation's deltas, ended; None if `value` does not parse."""
    try:
        deltas = replica_pb2.GenerateReply.FromString(value).deltas
    except Exception:  # a corrupt or foreign entry is a miss, never a failure
        log.warning("ignoring an unreadable response cache entry")
        return None
    if not deltas or not deltas[-1].finish_reason:
        return None
    sink = RequestSink(request_id, _Detached(), 1, choices)
    sink.limit = len(deltas)  # holds the whole answer at once: never an overflow
    for delta in deltas:
        sink.push(delta)
    return sink


class SharedGeneration:
    """One generation of a deterministic request, read by every identical request attached.

    Its task admits the request, submits it (with the usual retries before the
    first token and migrations after), and hands each delta to every attached
    client's sink, keeping them all for late joiners and for the cache. It ends
    when the generation does (stored in the cache if it finished well and
    `store` is set) or when its last client leaves (aborted on the replica).
    """

    def __init__(
        self,
        service: GenerationService,
        router: ModelRouter,
        request: replica_pb2.GenerateRequest,
        *,
        key: bytes,
        session_key: str | None,
        blocks: Sequence[int],
        output: Output | None,
        on_done: Callable[[SharedGeneration], None],
        store: Callable[[list[replica_pb2.RequestDelta]], Awaitable[Any]] | None,
    ) -> None:
        self.key = key
        self.router = router
        self.request = request
        self.choices = max(1, request.sampling.n)
        self.deltas: list[replica_pb2.RequestDelta] = []
        self.sinks: dict[str, RequestSink] = {}
        self.failure: ApiError | None = None
        """Why the generation produced nothing (a 503, a refusal): each client answers it."""
        self.finished = False
        self._service = service
        self._session_key = session_key
        self._blocks = blocks
        self._output = output
        self._on_done = on_done
        self._store = store
        self._stream = _Detached(self._overflowed)
        self.task: asyncio.Task[None] = asyncio.create_task(
            self._run(), name=f"shared-{request.request_id}"
        )

    def join(self, request_id: str, limit: int) -> RequestSink:
        """A sink for one more client, holding every delta so far."""
        sink = RequestSink(request_id, self._stream, limit, self.choices)
        sink.limit += len(self.deltas)
        for delta in self.deltas:
            sink.push(delta)
        if self.failure is not None or self.finished:
            sink.ended = True
        self.sinks[request_id] = sink
        return sink

    def leave(self, sink: RequestSink) -> None:
        """A client is done (or gone); the last one to leave a running generation aborts it.

        A generation that has ended is left alone: its task may still be writing the
        output to the cache.
        """
        sink.ended = True
        if self.sinks.pop(sink.request_id, None) is not None and not self.sinks:
            if not self.finished:
                self.task.cancel()
                self._on_done(self)

    def _overflowed(self, request_id: str) -> None:
        sink = self.sinks.get(request_id)
        if sink is not None:
            self.leave(sink)

    def _fan_out(self, delta: replica_pb2.RequestDelta) -> None:
        self.deltas.append(delta)
        for sink in list(self.sinks.values()):
            sink.push(delta)

    def _wake_all(self) -> None:
        for sink in self.sinks.values():
            sink.ended = True
            sink.wake()

    async def _run(self) -> None:
        service, router = self._service, self.router
        flow = Flow(router.name)
        lease: Lease | None = None
        ended_well = False
        try:
            await router.admission.acquire()
            try:
                client, sink = await service._first(
                    router, self.request, self._session_key, flow, self._output, self._blocks
                )
                lease = Lease(
                    client, sink, self.request, self._output, self._session_key, blocks=self._blocks
                )
                ended_well = await self._forward(lease, flow)
            finally:
                if lease is not None and lease.release():
                    router.metrics.aborts.inc()
                router.admission.release()
        except ApiError as exc:
            self.failure = exc
        except ClientGone:
            pass
        finally:
            self.finished = True
            self._wake_all()
            self._on_done(self)
        if ended_well and self._store is not None and lease is not None and not lease.migrations:
            try:
                await self._store(self.deltas)
            except Exception:  # the cache is an optimisation: never a failure
                log.exception("storing a response in the cache failed")

    async def _forward(self, lease: Lease, flow: Flow) -> bool:
        """Hand the generation's deltas on until it ends; True when it ended well."""
        left = self.choices
        while True:
            sink = lease.sink
            for delta in sink.take():
                if delta.finish_reason == "error":
                    if await self._service._migrate(self.router, lease, flow, delta):
                        break  # the continuation's deltas arrive in the new sink
                    self._fan_out(delta)
                    return False
                self._fan_out(delta)
                if delta.finish_reason:
                    left -= 1
                    if left <= 0:
                        return True
            else:
                if sink.overflowed:  # not reached: this task drains at once
                    return False
                await sink.wait()


@dataclass(slots=True)
class Deterministic:
    """A deterministic request on its way to the cache or a shared generation."""

    request: replica_pb2.GenerateRequest
    inp: GenerationInput
    output: Output | None
    """Where its output is recorded, when it may migrate."""
    key: bytes
    headers: Iterable[tuple[bytes, bytes]]
    """The HTTP request's headers (for Cache-Control)."""


Serve = Callable[..., Awaitable[int]]
"""One of `GenerationService`'s response writers: (send, router, lease, fmt, flow, arrived,
headers) -> the HTTP status sent."""


class SharedGenerations:
    """The gateway's response cache and the generations in flight identical requests join."""

    def __init__(self, service: GenerationService, cache: ResponseCache | None) -> None:
        self.service = service
        self.cache = cache
        self.in_flight: dict[bytes, SharedGeneration] = {}
        """Generations identical requests may join, by request key (coalescing)."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(
        self,
        serve: Serve,
        send: Any,
        router: ModelRouter,
        request: Deterministic,
        fmt: StreamFormat,
        flow: Flow,
        arrived: float,
        headers: list[tuple[bytes, bytes]],
    ) -> int:
        """Serve a deterministic request from the cache, or from a generation it may share.

        A cache hit reaches no replica. Otherwise the request joins the identical one in
        flight (coalescing) or starts a `SharedGeneration` that stores its output in
        the cache when it ends well. Each client reads its own sink, at its own pace,
        through `serve`, as any request.
        """
        req, inp = request.request, request.inp
        cache = self.cache if router.cache_ttl_s else None
        read, write = cache_directives(request.headers)
        choices = max(1, inp.sampling.n)
        if cache is not None and read:
            value = await cache.get(router.name, request.key)
            sink = replay_sink(value, fmt.request_id, choices) if value is not None else None
            if sink is not None:
                headers.append((CACHE_HEADER, b"HIT"))
                flow.charge = request_charge(req)
                lease = Lease(None, sink, req, None, inp.session_key)
                return await serve(send, router, lease, fmt, flow, arrived, headers)
        generation = self.in_flight.get(request.key) if router.coalesce else None
        if generation is not None:
            headers.append((CACHE_HEADER, b"COALESCED"))
            metrics.COALESCED.labels(router.name).inc()
        else:
            if cache is not None:
                headers.append((CACHE_HEADER, b"MISS" if read else b"BYPASS"))
            generation = self._start(router, request, cache if write else None)
        sink = generation.join(fmt.request_id, self.service.buffer_chunks)
        flow.sink = sink
        try:
            while not sink.items and not sink.ended and not flow.gone:
                await sink.wait()
            if flow.gone:
                raise ClientGone
            if not sink.items and generation.failure is not None:
                raise generation.failure
            flow.charge = request_charge(req)
            lease = Lease(None, sink, req, None, inp.session_key)
            return await serve(send, router, lease, fmt, flow, arrived, headers)
        finally:
            generation.leave(sink)

    def _start(
        self, router: ModelRouter, request: Deterministic, cache: ResponseCache | None
    ) -> SharedGeneration:
        key = request.key
        ttl_s = router.cache_ttl_s
        store = None
        if cache is not None:

            async def store(deltas: list[replica_pb2.RequestDelta]) -> None:
                await cache.put(router.name, key, encode(deltas), ttl_s)

        def done(generation: SharedGeneration) -> None:
            if self.in_flight.get(key) is generation:
                del self.in_flight[key]

        generation = SharedGeneration(
            self.service,
            router,
            request.request,
            key=key,
            session_key=request.inp.session_key,
            blocks=router.prompt_blocks(request.inp),
            output=request.output,
            on_done=done,
            store=store,
        )
        if router.coalesce:
            self.in_flight[key] = generation
        self._tasks.add(generation.task)
        generation.task.add_done_callback(self._tasks.discard)
        return generation

    async def close(self, timeout_s: float = 5.0) -> None:
        """Let generations finish their cache writes (bounded), then cancel the rest."""
        pending = set(self._tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
