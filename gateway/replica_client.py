"""The gateway's side of one replica: long-lived multiplexed Generate streams and health.

Requests are not one gRPC call each. The client keeps one (or a few) Generate
streams open per replica and writes every request onto one of them, tagged
with its request id; the replica answers with one message per engine step
holding the deltas of every request that advanced. A reader task per stream
hands each delta to the request's `RequestSink`, a bounded inbox the HTTP
handler drains, and a flusher task writes the tokens of running streams to
their clients, so the next reply's first tokens need not wait for those
writes; nothing on this path waits for a slow client. The stream tells the
replica how many replies it has written out, and the replica holds its next
reply while two are unread: when this side falls behind, the steps produced
meanwhile come as one reply, not as a queue in the connection that a new
request's first token would wait behind.

Failures: when a stream breaks, every request on it gets an UNAVAILABLE error
delta (retried elsewhere if it had produced nothing yet, migrated if it had)
and the stream reopens on the next request. A stream that broke with requests
running takes the replica out of rotation at once; other transport failures
and requests the engine failed count toward `failure_threshold`. Past it, or
when the replica says it is not ready (UNAVAILABLE from the replica, or Health
not ready), the replica leaves the rotation and a probe brings it back after a
successful Health call. gRPC keepalive (`mss.rpc`) notices a replica whose
host went silent within about a second, even mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

import grpc

from gateway.routing import ReplicaStats
from mss.rpc import STREAM_CHANNEL_OPTIONS, status_number
from mss.rpc_auth import channel, describe
from mss.security import Credentials
from protos import replica_pb2, replica_pb2_grpc

log = logging.getLogger(__name__)

UNAVAILABLE = status_number(grpc.StatusCode.UNAVAILABLE)
"""The status a replica that cannot take requests answers with, and a broken stream's."""
INTERNAL = status_number(grpc.StatusCode.INTERNAL)
"""The status of a request the replica's engine failed."""
UNAPPLIED_LIMIT = 4
"""Messages a Generate stream may have written that the replica has not yet applied."""
FLUSH_BACKLOG = 2
"""Replies read whose tokens are not yet being written, past which the reader waits."""
WRITE_SLICE_S = 0.0005
"""Loop time a replica stream's flusher spends writing tokens to clients before it lets
the rest of the event loop run (new requests, first tokens, finishes)."""
PROBE_TIMEOUT_S = 2.0
PROBE_MAX_DELAY_S = 2.0
TOKENIZE_TIMEOUT_S = 10.0
"""Deadline of a Tokenize or Detokenize call (a long chat renders in milliseconds)."""


class Output:
    """What a one-choice request has received so far: enough to continue it on another
    replica if its own fails (`GenerationService` migrates it).

    The text's length matters only when the replica may hold text back from its
    deltas (a tail that could begin a stop string), so it is counted only then
    (`count_text`): the token ids alone cost a fraction of a microsecond a token.
    """

    __slots__ = ("count_text", "text_chars", "token_ids")

    def __init__(self, count_text: bool = False) -> None:
        self.token_ids: list[int] = []
        self.count_text = count_text
        self.text_chars = 0

    def record(self, delta: replica_pb2.RequestDelta) -> None:
        self.token_ids.extend(delta.token_ids)
        if self.count_text:
            self.text_chars += len(delta.text)


class RequestStream(Protocol):
    """What a sink needs of the stream its request went out on: a way to cancel it."""

    def cancel(self, request_id: str) -> None: ...


class RequestSink:
    """The inbox of one request on a replica stream; bounded, never blocks the reader.

    `push` appends a delta and wakes the waiting handler (or, for a stream's
    tokens, holds it for `flush`, which the stream's flusher calls once per reply
    and which writes them to the client through `direct`). When more than `limit`
    deltas wait unread (the client is not reading), the request is cancelled on
    the replica and the sink is marked overflowed. A request of n choices ends
    when n deltas with a finish reason arrived, or at once on an error.
    """

    __slots__ = (
        "_loop",
        "_waiter",
        "choices",
        "completion_offset",
        "direct",
        "direct_deltas",
        "ended",
        "fresh",
        "held",
        "items",
        "limit",
        "output",
        "overflowed",
        "request_id",
        "stream",
    )

    def __init__(
        self, request_id: str, stream: RequestStream, limit: int, choices: int = 1
    ) -> None:
        self.request_id = request_id
        self.stream = stream
        self.choices = max(1, choices)
        """Choices still running."""
        self.limit = limit * self.choices
        self.items: list[replica_pb2.RequestDelta] = []
        self.ended = False
        """True once the last choice's finish (or an error) arrived, or the request was dropped."""
        self.overflowed = False
        self.fresh = True
        """No delta has arrived yet."""
        self.held = False
        """A delta of this request waits in the reader's batch: the next ones wait too."""
        self.output: Output | None = None
        """Where the token ids and text length of each delta are recorded, when the request
        may migrate."""
        self.completion_offset = 0
        """Tokens produced before this (migrated) request began: added to its last delta's
        completion count, so the usage covers the whole output."""
        self.direct: Callable[[list[replica_pb2.RequestDelta]], bool] | None = None
        """The handler's way to write tokens to its client at once, set while it streams:
        deltas that are not a finish, arriving while the handler waits with nothing
        queued, are held and written there by `flush`, instead of waking it (False: it
        could not, and they are queued for the handler)."""
        self.direct_deltas: list[replica_pb2.RequestDelta] = []
        """Tokens held for `direct` until the flusher's `flush`."""
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()

    def push(self, delta: replica_pb2.RequestDelta) -> bool:
        """Take a delta; True when it is the first held for `flush` (the stream's flusher
        then calls `flush` once the reader has handed out the whole reply)."""
        items = self.items
        finish = delta.finish_reason
        if finish:
            self._unhold()
            items.append(delta)
            self.choices -= 1
            if self.choices <= 0 or finish == "error":
                self.ended = True
            elif self.output is not None:
                self.output.record(delta)
            if self.completion_offset and finish != "error":
                delta.completion_tokens += self.completion_offset
        else:
            output = self.output
            if output is not None:  # inline: once per token of every stream
                ids = delta.token_ids
                if len(ids) == 1:
                    output.token_ids.append(ids[0])
                else:
                    output.token_ids.extend(ids)
                if output.count_text:
                    output.text_chars += len(delta.text)
            if not items and self.direct is not None:
                waiter = self._waiter
                # Only while the handler waits for deltas, never while it writes.
                if waiter is not None and not waiter.done():
                    direct = self.direct_deltas
                    direct.append(delta)
                    return len(direct) == 1
            items.append(delta)
            if len(items) > self.limit and not self.overflowed:
                self.overflowed = True
                self.ended = True
                self.stream.cancel(self.request_id)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return False

    def flush(self) -> None:
        """Write the tokens held for the handler's `direct` in one write; when it cannot,
        they go to the handler like any other delta."""
        held = self.direct_deltas
        if not held:
            return
        direct = self.direct
        self.direct_deltas = []
        if direct is not None and direct(held):
            return
        self.items[:0] = held
        self.wake()

    def _unhold(self) -> None:
        """A delta that goes to the handler goes behind the tokens held for `flush`."""
        if self.direct_deltas:
            self.items[:0] = self.direct_deltas
            self.direct_deltas = []

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def arm(self) -> asyncio.Future[None]:
        """A future that `push` or `wake` completes; await it when there is nothing to take."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter = waiter
        return waiter

    async def wait(self) -> None:
        """Return once there are deltas to take, the request ended, or `wake` was called."""
        if not self.items and not self.ended:
            await self.arm()

    def take(self) -> list[replica_pb2.RequestDelta]:
        items = self.items
        if items:
            self.items = []
        return items


def error_delta(request_id: str, code: int, message: str) -> replica_pb2.RequestDelta:
    return replica_pb2.RequestDelta(
        request_id=request_id,
        finish_reason="error",
        error=replica_pb2.RequestError(code=code, message=message),
    )


class GenerateStream:
    """One open Generate call: a writer draining the outbox, a reader dispatching deltas and
    a flusher writing the tokens of running streams to their clients."""

    def __init__(self, client: ReplicaClient) -> None:
        self.client = client
        self.pending: dict[str, RequestSink] = {}
        self.closed = False
        self._outbox: deque[replica_pb2.GenerateClientMessage] = deque()
        self._wake = asyncio.Event()
        self._writing = False
        self.written = 0
        """Messages written on this stream."""
        self.applied = 0
        """Of those, the ones the replica says it has applied (`GenerateReply.applied`)."""
        self.acking = False
        """The replica reports `applied` (it has once): writes then wait for it."""
        self.consumed = 0
        """Replies read that count (`GenerateReply.unread_limit`) whose tokens the flusher
        has written out."""
        self.reported = 0
        """The count of consumed replies last sent to the replica."""
        self.pacing = False
        """The replica holds replies until they are consumed (it said so in one):
        the count goes back to it."""
        self.call = client.stub.Generate(wait_for_ready=False, metadata=client.metadata)
        self._flushes: deque[tuple[list[RequestSink], bool]] = deque()
        """Per reply read, the sinks whose tokens the flusher writes to their clients, and
        whether the reply counts as consumed once they are written."""
        self._flushed = asyncio.Event()
        """Set when a list is queued for the flusher, or the stream closed."""
        self._room = asyncio.Event()
        """Set when the flusher took a list: the reader reads on."""
        self._writer = asyncio.create_task(self._write(), name=f"replica-write-{client.replica_id}")
        self._reader = asyncio.create_task(self._read(), name=f"replica-read-{client.replica_id}")
        self._flusher = asyncio.create_task(
            self._flush(), name=f"replica-flush-{client.replica_id}"
        )

    def submit(self, request: replica_pb2.GenerateRequest, limit: int) -> RequestSink:
        rid = request.request_id
        if rid in self.pending:
            rid = f"{rid}~{next(self.client.suffixes)}"
            request.request_id = rid
        sink = RequestSink(rid, self, limit, request.sampling.n)
        self.pending[rid] = sink
        self._outbox.append(replica_pb2.GenerateClientMessage(request=request))
        self._wake.set()
        return sink

    def cancel(self, request_id: str) -> None:
        """Abort a request on the replica; later deltas for it are dropped."""
        if self.pending.pop(request_id, None) is not None and not self.closed:
            cancel = replica_pb2.CancelRequest(request_id=request_id)
            self._outbox.append(replica_pb2.GenerateClientMessage(cancel=cancel))
            self._wake.set()

    @property
    def idle(self) -> bool:
        """Not writing, nothing queued and room in the window: a new request goes out at once."""
        return not self._writing and not self._outbox and not self.closed and not self._full()

    def backlog(self) -> int:
        return len(self._outbox) + self._writing + self._full()

    def _full(self) -> bool:
        """The replica has not yet applied `UNAPPLIED_LIMIT` messages written to it."""
        return self.acking and self.written - self.applied >= UNAPPLIED_LIMIT

    def acknowledge(self, applied: int) -> None:
        """A reply said how many messages the replica applied: room for the next write."""
        self.acking = True
        if applied > self.applied:
            self.applied = applied
            if self._outbox:
                self._wake.set()

    async def _write(self) -> None:
        """Write what queued as one message, at most `UNAPPLIED_LIMIT` ahead of the replica.

        gRPC completes a write once the message is handed to the connection,
        not once the replica has read it, and a replica busy with its streams
        reads one message per turn or two of its event loop. Writing each
        request as it comes would queue messages in the connection, each new
        request waiting behind every earlier message (seconds at a thousand
        streams). Held here until the replica applied the ones before, the
        requests that arrived meanwhile leave as one message and reach the
        engine together.

        Each message also carries how many replies the flusher has written out, once
        the replica holds replies on that count (`GenerateReply.unread_limit`); with
        no message to carry it, it goes alone.
        """
        outbox = self._outbox
        try:
            while not self.closed:
                while outbox and not self._full():
                    message = _message(outbox)
                    if self.pacing:
                        message.consumed = self.reported = self.consumed
                    self.written += 1
                    await self._send(message)
                if self.pacing and self.consumed > self.reported:
                    # Nothing to carry the count: a message of its own, outside the
                    # window of unapplied messages (the replica does not answer it).
                    self.reported = self.consumed
                    await self._send(replica_pb2.GenerateClientMessage(consumed=self.reported))
                    continue
                self._wake.clear()
                await self._wake.wait()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            # The reader sees the same failure and fails the stream's requests.
            log.debug("write to %s failed: %r", self.client.address, exc)

    async def _send(self, message: replica_pb2.GenerateClientMessage) -> None:
        self._writing = True
        try:
            await self.call.write(message)
        finally:
            self._writing = False

    async def _flush(self) -> None:
        """Write the tokens of each reply read to their clients, reply after reply.

        Tokens go out in slices: between two, whatever else is ready runs (the reader
        handing out the next reply's first tokens, a new request's handler, the writer
        sending it), so neither new requests nor first tokens wait behind a whole reply's
        writes. A sink is in one list at a time (`RequestSink.push` says when it joins one),
        and its flush writes every token it holds by then, so each stream keeps its order.
        A reply counts as consumed once its tokens are written.
        """
        loop_time = asyncio.get_running_loop().time
        flushes = self._flushes
        while flushes or not self.closed:
            if not flushes:
                self._flushed.clear()
                await self._flushed.wait()
                continue
            flush, counted = flushes.popleft()
            self._room.set()
            slice_end = loop_time() + WRITE_SLICE_S
            for sink in flush:
                try:
                    sink.flush()
                except Exception:  # one client's failure; the others' tokens go on
                    log.exception("writing tokens of %s failed", sink.request_id)
                if loop_time() > slice_end:
                    await asyncio.sleep(0)
                    slice_end = loop_time() + WRITE_SLICE_S
            if counted:
                self.consumed += 1
                self._wake.set()

    async def _read(self) -> None:
        client = self.client
        stats = client.stats
        pending = self.pending
        reason = "stream ended"
        try:
            while True:
                reply = await self.call.read()
                if reply is grpc.aio.EOF:
                    break
                if reply.applied:
                    self.acknowledge(reply.applied)
                # A request's first and last outputs are handed out before the others,
                # so their handlers run first: with hundreds of streams advancing in one
                # engine step, time to first token and to the end of a response do not
                # pay for all the streams in the middle of theirs.
                # A reply may hold several deltas of one request (its n choices, or
                # steps the replica coalesced): once one of them waits, the request's
                # later ones wait behind it, so each request's deltas keep their order.
                # Tokens a waiting handler's `direct` takes are held in its sink and
                # written once the whole reply is handed out: one write per client per
                # reply, however many of its steps the reply holds.
                # Two lists, not one of pairs: a pair per token is an object the garbage
                # collector tracks, and at a thousand streams these pairs set off about a
                # third of its young passes.
                later_sinks: list[RequestSink] = []
                later: list[replica_pb2.RequestDelta] = []
                flush: list[RequestSink] = []
                for delta in reply.deltas:
                    rid = delta.request_id
                    sink = pending.get(rid)
                    if sink is None:
                        continue
                    if sink.held:
                        later_sinks.append(sink)
                        later.append(delta)
                    elif delta.finish_reason:
                        sink.push(delta)
                        if sink.ended:
                            self._finished(rid, delta)
                    elif sink.fresh:
                        sink.fresh = False
                        if sink.push(delta):
                            flush.append(sink)
                    else:
                        sink.held = True
                        later_sinks.append(sink)
                        later.append(delta)
                for sink, delta in zip(later_sinks, later, strict=True):
                    sink.held = False
                    if sink.push(delta):
                        flush.append(sink)
                    if delta.finish_reason and sink.ended:
                        self._finished(delta.request_id, delta)
                load = reply.load
                stats.running = load.running
                stats.waiting = load.waiting
                stats.kv_cache_usage = load.kv_cache_usage
                stats.prefix_cache_hit_rate = load.prefix_cache_hit_rate
                stats.max_in_flight = load.max_in_flight
                # Only replies that say the replica holds on them count as consumed:
                # its replies of first deltas and of applied counts go ahead, uncounted.
                counted = reply.unread_limit > 0
                if counted:
                    self.pacing = True
                if not flush:
                    if counted:  # nothing to write: consumed already
                        self.consumed += 1
                        self._wake.set()
                    continue
                # The tokens of running streams go to the flusher; the next reply's first
                # tokens do not wait for their writes. Never far ahead of those writes (a
                # replica that does not hold its replies until they are consumed would
                # otherwise fill this queue).
                self._flushes.append((flush, counted))
                self._flushed.set()
                while len(self._flushes) > FLUSH_BACKLOG:
                    self._room.clear()
                    await self._room.wait()
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            self._fail_all("gateway closing the replica connection")
            raise
        lost = bool(self.pending)
        self._fail_all(f"replica {client.replica_id} stream failed ({reason})")
        if client.closing:
            return
        if lost:
            # Requests were running there: take the replica out at once (a probe brings
            # it back within a fraction of a second if it is fine), so neither new
            # requests nor the ones moving off it land on it meanwhile.
            client.mark_not_ready(f"stream failed with requests running ({reason})")
        else:
            client.transport_failed(reason)

    def _finished(self, request_id: str, delta: replica_pb2.RequestDelta) -> None:
        """The request's last delta was handed out: forget it. A replica not ready (or whose
        engine died) leaves the rotation; failed requests count toward the threshold."""
        self.pending.pop(request_id, None)
        code = delta.error.code
        if code == UNAVAILABLE:
            self.client.mark_not_ready(delta.error.message)
        elif code == INTERNAL:
            self.client.request_failed(delta.error.message)

    def _fail_all(self, message: str) -> None:
        self.closed = True
        self._wake.set()
        self._flushed.set()
        self.client.stream_closed(self)
        pending = list(self.pending.values())
        self.pending.clear()
        for sink in pending:
            sink.push(error_delta(sink.request_id, UNAVAILABLE, message))

    async def close(self) -> None:
        self.closed = True
        self.call.cancel()
        self._wake.set()
        for task in (self._writer, self._reader, self._flusher):
            task.cancel()
        await asyncio.gather(self._writer, self._reader, self._flusher, return_exceptions=True)


def _message(
    outbox: deque[replica_pb2.GenerateClientMessage],
) -> replica_pb2.GenerateClientMessage:
    """Everything queued, as one message: what arrived while the last write was in
    flight goes out together, so a burst of new requests costs one write, not one each."""
    if len(outbox) == 1:
        return outbox.popleft()
    batch = replica_pb2.RequestBatch(messages=outbox)
    outbox.clear()
    return replica_pb2.GenerateClientMessage(batch=batch)


class ReplicaClient:
    """Connection, streams, health and routing stats of one replica."""

    def __init__(
        self,
        model: str,
        replica_id: str,
        address: str,
        *,
        streams: int = 1,
        failure_threshold: int = 3,
        on_change: Callable[[], None] | None = None,
        creds: Credentials | None = None,
    ) -> None:
        self.model = model
        self.replica_id = replica_id
        self.address = address
        self.stats = ReplicaStats(replica_id, healthy=False)
        self.max_model_len = 0
        """The model's context length, as the replica's Health last said (0: not known yet)."""
        self.failure_threshold = failure_threshold
        self.failures = 0
        self.closing = False
        self.suffixes = itertools.count(1)
        self._n_streams = max(1, streams)
        self._streams: list[GenerateStream] = []
        self._next_stream = 0
        self._probe: asyncio.Task[None] | None = None
        self._on_change = on_change
        self._idle = asyncio.Event()
        creds = creds or Credentials(role="gateway")
        self.metadata = creds.metadata()
        self.channel = channel(address, creds, "replica", STREAM_CHANNEL_OPTIONS)
        self.stub = replica_pb2_grpc.ReplicaStub(self.channel)

    # Requests

    def submit(self, request: replica_pb2.GenerateRequest, buffer_limit: int) -> RequestSink:
        """Send a request on one of the replica's streams; deltas arrive in the sink.

        gRPC sends one message at a time per stream, each waiting for the event
        loop to see the previous one complete; a burst of requests would queue
        behind each other. So a request goes to a stream that is not writing, and
        another stream is opened (up to the limit) only when all are busy.
        """
        streams = self._streams
        stream = None
        for s in streams:
            if s.idle:
                stream = s
                break
        if stream is None:
            if len(streams) < self._n_streams:
                stream = GenerateStream(self)
                streams.append(stream)
            else:
                stream = min(streams, key=GenerateStream.backlog)
        self.stats.in_flight += 1
        return stream.submit(request, buffer_limit)

    def release(self, sink: RequestSink) -> None:
        """The request is over for the gateway: abort it on the replica if still running."""
        self.stats.in_flight -= 1
        if self.stats.removed and self.stats.in_flight == 0:
            self._idle.set()
        if not sink.ended:
            sink.ended = True
            sink.stream.cancel(sink.request_id)

    async def tokenize(self, request: replica_pb2.TokenizeRequest) -> replica_pb2.TokenizeResponse:
        """Tokenize a prompt or chat on the replica; raises grpc.aio.AioRpcError on failure."""
        return await self.stub.Tokenize(request, timeout=TOKENIZE_TIMEOUT_S, metadata=self.metadata)

    async def detokenize(
        self, request: replica_pb2.DetokenizeRequest
    ) -> replica_pb2.DetokenizeResponse:
        """Decode token ids on the replica; raises grpc.aio.AioRpcError on failure."""
        return await self.stub.Detokenize(
            request, timeout=TOKENIZE_TIMEOUT_S, metadata=self.metadata
        )

    def stream_closed(self, stream: GenerateStream) -> None:
        with contextlib.suppress(ValueError):
            self._streams.remove(stream)

    # Health

    def start(self) -> None:
        """Probe the replica; it joins the rotation once Health says ready."""
        self._ensure_probe()

    def mark_not_ready(self, reason: str) -> None:
        """The replica said it cannot take requests (loading, draining)."""
        if self.stats.healthy:
            log.warning("replica %s (%s) not ready: %s", self.replica_id, self.address, reason)
            self._set_healthy(False)
        self._ensure_probe()

    def request_failed(self, reason: str) -> None:
        """The engine failed a request: counts toward the threshold like a transport failure
        (a replica whose every request fails leaves the rotation)."""
        self.failures += 1
        log.debug(
            "replica %s failed a request (%d in a row): %s", self.replica_id, self.failures, reason
        )
        if self.failures >= self.failure_threshold and self.stats.healthy:
            log.warning(
                "replica %s (%s) failed %d requests in a row: %s",
                self.replica_id,
                self.address,
                self.failures,
                reason,
            )
            self._set_healthy(False)
            # Its Health may well say ready: wait before the probe lets it back.
            self._ensure_probe(first_delay=PROBE_MAX_DELAY_S)

    def transport_failed(self, reason: str) -> None:
        self.failures += 1
        log.warning(
            "replica %s (%s) failed (%d in a row): %s",
            self.replica_id,
            self.address,
            self.failures,
            reason,
        )
        if self.failures >= self.failure_threshold and self.stats.healthy:
            self._set_healthy(False)
        self._ensure_probe()

    def _set_healthy(self, healthy: bool) -> None:
        if self.stats.healthy != healthy:
            self.stats.healthy = healthy
            if healthy:
                log.info("replica %s (%s) is in rotation", self.replica_id, self.address)
            else:
                log.warning("replica %s (%s) left the rotation", self.replica_id, self.address)
            if self._on_change is not None:
                self._on_change()

    def _ensure_probe(self, first_delay: float = 0.0) -> None:
        if self.closing or (self._probe is not None and not self._probe.done()):
            return
        self._probe = asyncio.create_task(
            self._probe_loop(first_delay), name=f"probe-{self.replica_id}"
        )

    async def probe_once(self) -> bool:
        """One Health call; True when the replica is ready. Updates load and health."""
        try:
            resp = await self.stub.Health(
                replica_pb2.HealthRequest(), timeout=PROBE_TIMEOUT_S, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as exc:
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self._set_healthy(False)
            if self.failures == self.failure_threshold:
                log.warning("replica %s at %s: %s", self.replica_id, self.address, describe(exc))
            else:
                log.debug("probe of %s failed: %s", self.address, exc.code().name)
            return False
        load = resp.load
        self.stats.running = load.running
        self.stats.waiting = load.waiting
        self.stats.kv_cache_usage = load.kv_cache_usage
        self.stats.prefix_cache_hit_rate = load.prefix_cache_hit_rate
        self.stats.max_in_flight = load.max_in_flight
        if resp.max_model_len:
            self.max_model_len = resp.max_model_len
        if resp.model and resp.model != self.model:
            log.error(
                "replica at %s serves %r, not %r; keeping it out",
                self.address,
                resp.model,
                self.model,
            )
            self._set_healthy(False)
            return False
        if not resp.ready:
            self._set_healthy(False)
            return False
        self.failures = 0
        self._set_healthy(True)
        return True

    async def _probe_loop(self, first_delay: float = 0.0) -> None:
        if first_delay:
            await asyncio.sleep(first_delay)
        delay = 0.1
        while not self.closing:
            if await self.probe_once():
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, PROBE_MAX_DELAY_S)

    async def close(self) -> None:
        self.closing = True
        self.stats.removed = True
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in list(self._streams)), return_exceptions=True)
        await self.channel.close()

    async def close_when_idle(self, deadline_s: float) -> None:
        """Leave the rotation now; close once the gateway has nothing left on it."""
        self.stats.removed = True
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        if self.stats.in_flight > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(0.0, end - loop.time()))
        await self.close()
