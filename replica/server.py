"""The replica's gRPC service: many requests multiplexed over each Generate stream.

A gateway keeps one long-lived bidirectional stream per replica and sends
every request on it, tagged with its request id. Each request runs as its own
task feeding the stream's outbox; the stream's writer sends everything in the
outbox as one `GenerateReply`. Because the engine hands out the outputs of one
step to all its requests in one go, one reply carries one engine step for
every request on the stream: the per-token cost of Python gRPC is paid once
per step, not once per token per request. Each reply also says how many of
the gateway's messages the stream has applied (`GenerateReply.applied`), and
one goes out as soon as a message is applied, tokens or not: the gateway holds
its next message until then (`gateway.replica_client.GenerateStream._write`).
The other way round, once the gateway reports how many replies it has
consumed (`GenerateClientMessage.consumed`), a stream holds its next reply of
tokens while `UNREAD_LIMIT` of them are unread: steps produced meanwhile go out
together in the next one. A new request's first delta, and the count of
applied messages, do not wait for that: they go out in a small reply of their
own, ahead of the held one and not counted (`_Stream.next_batch`). Nor are
replies of tokens counted while they come slower than `PACED_DELTAS_PER_S`
(a real engine on a CPU, a few steps a second): a gateway cannot fall behind
those, and each count would cost a gRPC message back per engine step.

Each request's task first has the engine tokenize it (off the event loop, see
`Engine.prepare`), then streams its deltas: one per choice per engine step,
tagged with the choice's index, each choice's finish reason on its last delta
and the request's token totals on the request's last. Admission is decided when the
request's message is applied, in the order messages arrive, so a refusal, a
duplicate id or a cancel right behind its request all behave as if the whole
request were handled at once.

Cancellation has one path: a CancelRequest, the stream ending or a drain
deadline cancels the request's task (`_Stream.cancel`, `_Stream.cancel_all`),
and `Engine.stream_to` aborts the engine request as the CancelledError passes
through it (`Engine.generate`'s docstring tells the whole path).

Tokenize and Detokenize are plain unary calls: the same rendering as Generate,
with no engine slot taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator

import grpc

from mss.logs import request_id_var
from mss.rpc import status_number
from protos import replica_pb2, replica_pb2_grpc
from replica.engine import Delta, Engine, EngineDead, InvalidRequest
from replica.metrics import ReplicaMetrics

log = logging.getLogger(__name__)

# Codes carried in a RequestError: one request fails, its stream goes on.
INVALID_ARGUMENT = status_number(grpc.StatusCode.INVALID_ARGUMENT)
RESOURCE_EXHAUSTED = status_number(grpc.StatusCode.RESOURCE_EXHAUSTED)
UNAVAILABLE = status_number(grpc.StatusCode.UNAVAILABLE)
INTERNAL = status_number(grpc.StatusCode.INTERNAL)

UNREAD_LIMIT = 2
"""Replies of tokens a Generate stream may have sent that the gateway has not consumed,
once it reports what it consumed: one it handles while the next is on its way."""

PACED_DELTAS_PER_S = 5_000.0
"""A reply of tokens counts toward `UNREAD_LIMIT` (and the gateway reports it consumed)
when its deltas came at this rate or more since the reply before, or while replies
counted earlier are unread. A gateway writes a token in about 15 µs, so below this
rate it keeps up with a tenth of a core: 64 streams at the fake engine's 10 ms steps
are paced, the bundled model's 16 or 64 streams on a CPU (under 500 deltas a second)
are not."""


class ReplicaService(replica_pb2_grpc.ReplicaServicer):
    """Admission, multiplexing and draining around one engine."""

    def __init__(
        self,
        engine: Engine,
        replica_id: str,
        max_in_flight: int,
        log_prompts: bool = False,
        paced_deltas_per_s: float = PACED_DELTAS_PER_S,
    ) -> None:
        self.engine = engine
        self.log_prompts = log_prompts
        """Write each rendered prompt to the log (a debugging aid; off by default)."""
        self.paced_deltas_per_s = paced_deltas_per_s
        """`PACED_DELTAS_PER_S`; 0 counts every reply of tokens."""
        self.replica_id = replica_id
        self.max_in_flight = max_in_flight
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self.metrics = ReplicaMetrics(engine.model_name, self)
        self._streams: set[_Stream] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self._stream_ids = itertools.count(1)

    def load_pb(self) -> replica_pb2.Load:
        load = self.engine.load
        return replica_pb2.Load(
            running=load.running,
            waiting=load.waiting,
            kv_cache_usage=load.kv_cache_usage,
            in_flight=self.in_flight,
            max_in_flight=self.max_in_flight,
            prefix_cache_hit_rate=load.prefix_cache_hit_rate,
            prefix_cache_queries=load.prefix_cache_queries,
            prefix_cache_hits=load.prefix_cache_hits,
        )

    async def Health(
        self, request: replica_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> replica_pb2.HealthResponse:
        return replica_pb2.HealthResponse(
            ready=self.ready and not self.draining and not self.engine.dead.is_set(),
            model=self.engine.model_name,
            load=self.load_pb(),
            draining=self.draining,
            replica_id=self.replica_id,
            max_model_len=self.engine.max_model_len,
        )

    async def Tokenize(
        self, request: replica_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> replica_pb2.TokenizeResponse:
        """The prompt's or rendered messages' token ids, rendered exactly as Generate would."""
        await self._check_serving(context)
        try:
            return await self.engine.tokenize(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort raises; this line only tells type checkers so

    async def Detokenize(
        self, request: replica_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> replica_pb2.DetokenizeResponse:
        await self._check_serving(context)
        try:
            return await self.engine.detokenize(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise

    async def _check_serving(self, context: grpc.aio.ServicerContext) -> None:
        """UNAVAILABLE until the engine (and so its tokenizer) has loaded. Draining replicas
        still answer: tokenizing holds no engine slot."""
        if not self.ready:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"replica {self.replica_id} is loading"
            )

    async def Generate(
        self,
        request_iterator: AsyncIterator[replica_pb2.GenerateClientMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[replica_pb2.GenerateReply]:
        stream = _Stream(self, next(self._stream_ids))
        self._streams.add(stream)
        reader = asyncio.create_task(stream.read(request_iterator), name="replica-stream-reader")
        try:
            while (reply := await stream.next_batch()) is not None:
                reply.load.CopyFrom(self.load_pb())
                yield reply
        finally:
            self._streams.discard(stream)
            reader.cancel()
            await stream.cancel_all()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests, let in-flight ones finish until the deadline, cancel the rest."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), timeout_s)
        if self.in_flight:
            log.warning("drain deadline passed; cancelling %d requests", self.in_flight)
            await asyncio.gather(*(s.cancel_all("replica shutting down") for s in self._streams))


class _Stream:
    """One Generate stream: its requests' tasks and the outbox they fill."""

    def __init__(self, service: ReplicaService, number: int) -> None:
        self.service = service
        self.number = number
        self.tasks: dict[str, asyncio.Task[str | None]] = {}
        self.outbox = replica_pb2.GenerateReply()
        self.add = self.outbox.deltas.add
        self.firsts = replica_pb2.GenerateReply()
        """Requests' first deltas (and refusals) produced while replies are held: they go out
        in a reply of their own, ahead of the held one."""
        self.wake = asyncio.Event()
        self.reading = True
        self.applied = 0
        """Client messages read and applied so far; each reply carries the count."""
        self.acked = 0
        """The count the last reply carried."""
        self.sent = 0
        """Replies handed to gRPC."""
        self.consumed = 0
        """Of those, the ones the gateway says it has read and written out."""
        self.paced = False
        """The gateway reports `consumed` (it has once): replies then wait for it."""
        self.last_tokens = 0.0
        """Loop time the last reply of tokens went out."""

    def push(self, **fields: object) -> None:
        """Add a delta to the reply being built (no copy: built in place)."""
        self.add(**fields)
        self.wake.set()

    def unread(self) -> int:
        """Replies of tokens sent that the gateway has not consumed; 0 while it does not count
        them."""
        return self.sent - self.consumed if self.paced and self.reading else 0

    def add_first(self, **fields: object) -> replica_pb2.RequestDelta:
        """Add a request's first delta: to the reply being built, or, while that one is held,
        to a reply that goes ahead of it."""
        if self.unread() >= UNREAD_LIMIT:
            delta = self.firsts.deltas.add(**fields)
        else:
            delta = self.add(**fields)
        self.wake.set()
        return delta

    async def next_batch(self) -> replica_pb2.GenerateReply | None:
        """Everything produced since the last call as one reply, with the count of messages
        applied (a reply without deltas when only that changed); None once the stream is
        done.

        Only replies of tokens count toward `UNREAD_LIMIT` (they carry `unread_limit`), and
        of those only the ones that come at `PACED_DELTAS_PER_S` or faster, or while
        replies counted before are unread.
        While that many are not consumed (and the gateway can still say it consumed
        them), the reply being built is held; first deltas, and the count of messages
        applied, go ahead of it in a reply that is not counted. The gateway has a
        bounded number of requests and messages here, so these are bounded too.
        """
        while True:
            held = self.unread() >= UNREAD_LIMIT
            if self.firsts.deltas or (
                self.applied != self.acked and (held or not self.outbox.deltas)
            ):
                reply = self.firsts
                self.firsts = replica_pb2.GenerateReply()
                break
            if self.outbox.deltas and not held:
                reply = self.outbox
                self.outbox = replica_pb2.GenerateReply()
                self.add = self.outbox.deltas.add
                now = asyncio.get_running_loop().time()
                rate = self.service.paced_deltas_per_s
                if self.unread() or len(reply.deltas) >= rate * (now - self.last_tokens):
                    reply.unread_limit = UNREAD_LIMIT
                    self.sent += 1
                self.last_tokens = now
                break
            if not self.reading and not self.tasks:
                return None
            self.wake.clear()
            await self.wake.wait()
        reply.applied = self.acked = self.applied
        return reply

    async def read(self, messages: AsyncIterator[replica_pb2.GenerateClientMessage]) -> None:
        try:
            async for message in messages:
                if message.consumed > self.consumed:
                    self.consumed = message.consumed
                    self.paced = True
                    self.wake.set()
                kind = message.WhichOneof("kind")
                if kind is None:  # only the count of consumed replies
                    continue
                if kind == "batch":
                    for item in message.batch.messages:
                        self.apply(item)
                else:
                    self.apply(message)
                self.applied += 1
                self.wake.set()
        except grpc.aio.AioRpcError as exc:  # the gateway went away mid-read
            log.debug("stream %d read ended: %s", self.number, exc.code())
        finally:
            self.reading = False
            self.wake.set()

    def apply(self, message: replica_pb2.GenerateClientMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "request":
            self.start(message.request)
        elif kind == "cancel":
            self.cancel(message.cancel.request_id)

    def cancel(self, rid: str) -> None:
        """The gateway's CancelRequest: cancel the request's task; unknown ids are ignored.

        That is all the server does; `Engine.stream_to` aborts the engine request
        as the CancelledError passes through it, wherever the task is (a request
        still being tokenized has nothing in the engine yet).
        """
        task = self.tasks.get(rid)
        if task is not None:
            task.cancel()

    def reject(self, request_id: str, code: int, message: str) -> None:
        self.service.metrics.rejected(code)
        self.add_first(
            request_id=request_id,
            finish_reason="error",
            error=replica_pb2.RequestError(code=code, message=message),
        )

    def start(self, request: replica_pb2.GenerateRequest) -> None:
        """Admit a request and start its task, or refuse it at once.

        Runs as the message is applied, so the checks see requests in arrival
        order and the task is known before the next message (a cancel) is read.
        """
        service = self.service
        rid = request.request_id
        if not rid:
            self.reject(rid, INVALID_ARGUMENT, "request_id: must not be empty")
            return
        if rid in self.tasks:
            self.reject(rid, INVALID_ARGUMENT, f"request_id: {rid!r} is already running")
            return
        if not service.ready or service.draining or service.engine.dead.is_set():
            if service.engine.dead.is_set():
                reason = f"down: {service.engine.death}"
            else:
                reason = "draining" if service.draining else "loading"
            self.reject(rid, UNAVAILABLE, f"replica {service.replica_id} is {reason}")
            return
        if service.in_flight >= service.max_in_flight:
            self.reject(
                rid,
                RESOURCE_EXHAUSTED,
                f"replica {service.replica_id} is at its limit of {service.max_in_flight} requests",
            )
            return
        service.in_flight += 1
        service.idle.clear()
        # The request's task and its release run in a context holding its id,
        # so every log line about the request names it.
        context = contextvars.copy_context()
        context.run(request_id_var.set, rid)
        task = asyncio.create_task(self.run(rid, request), name=f"request-{rid}", context=context)
        self.tasks[rid] = task
        # A callback rather than a `finally` in `run`: a task cancelled before
        # its first step (a cancel in the same batch as its request) never
        # runs its body, and its slot must still come back.
        release = functools.partial(self._release, rid, time.monotonic())
        task.add_done_callback(release, context=context)

    def _release(self, rid: str, admitted: float, task: asyncio.Task[str | None]) -> None:
        """Give back the request's slot and count its outcome, however its task ended."""
        service = self.service
        service.in_flight -= 1
        if not service.in_flight:
            service.idle.set()
        if self.tasks.get(rid) is task:
            del self.tasks[rid]
        self.wake.set()
        elapsed = time.monotonic() - admitted
        if task.cancelled():
            # Engine.stream_to aborted the engine request, if it had reached the engine.
            outcome: str | None = "abort"
            log.info("aborted after %.3f s", elapsed)
        else:
            outcome = task.result()
            if outcome is not None:
                log.debug("finished %s in %.3f s", outcome, elapsed)
        if outcome is not None:
            service.metrics.outcome(outcome)

    async def run(self, rid: str, request: replica_pb2.GenerateRequest) -> str | None:
        """One admitted request, to its last delta; returns its outcome for the metrics.

        The outcome is the finish reason, "error" when the engine failed the
        request, or None when it was refused as invalid. A CancelledError
        passes through; `_release` counts it.
        """
        try:
            return await self._serve(rid, request)
        except EngineDead as exc:
            # UNAVAILABLE: the gateway takes this replica out of rotation and moves
            # the request elsewhere; the replica stops and its scheduler restarts it.
            log.warning("failed: %s", exc)
            self.push(
                request_id=rid,
                finish_reason="error",
                error=replica_pb2.RequestError(
                    code=UNAVAILABLE, message=f"replica {self.service.replica_id}: {exc}"
                ),
            )
            return "error"
        except Exception as exc:
            # The engine failed this request: one line (the traceback at debug
            # level), and the gateway told, so it can retry or end the stream
            # with an error, while this replica keeps serving the others.
            traceback = log.isEnabledFor(logging.DEBUG)
            log.error("engine failed the request: %r", exc, exc_info=traceback)
            self.push(
                request_id=rid,
                finish_reason="error",
                error=replica_pb2.RequestError(code=INTERNAL, message=f"engine error: {exc}"),
            )
            return "error"

    async def _serve(self, rid: str, request: replica_pb2.GenerateRequest) -> str | None:
        """Tokenize, then stream deltas into the outbox; the finish reason, None if refused."""
        service = self.service
        try:
            prepared = await service.engine.prepare(request, f"{self.number}-{rid}")
        except InvalidRequest as exc:
            self.reject(rid, INVALID_ARGUMENT, str(exc))
            return None
        if service.log_prompts:
            log.info("prompt (%d tokens): %r", len(prepared.prompt_token_ids), prepared.prompt_text)
        outcome = "error"
        first = True
        wake = self.wake.set

        def push(d: Delta) -> None:
            # self.add, not a local: the outbox is swapped after each send.
            nonlocal outcome, first
            add = self.add
            if first:
                first = False
                add = self.add_first
            if d.finish_reason is None and d.logprobs is None and d.prompt_token_ids is None:
                # The per-token path: nothing but the text and its token ids.
                add(
                    request_id=rid,
                    text=d.text,
                    num_tokens=d.num_tokens,
                    index=d.index,
                    token_ids=d.token_ids,
                )
                wake()
                return
            delta = add(
                request_id=rid,
                text=d.text,
                num_tokens=d.num_tokens,
                index=d.index,
                token_ids=d.token_ids,
                finish_reason=d.finish_reason or "",
                stop_reason=d.stop_reason,
                prompt_tokens=d.prompt_tokens,
                completion_tokens=d.completion_tokens,
            )
            if d.logprobs:
                delta.logprobs.extend(d.logprobs)
            if d.prompt_token_ids is not None:
                delta.prompt_token_ids.extend(d.prompt_token_ids)
            if d.prompt_logprobs:
                delta.prompt_logprobs.extend(d.prompt_logprobs)
            wake()
            if d.last:
                outcome = d.finish_reason or "stop"
                service.metrics.finished(d.prompt_tokens, d.completion_tokens)

        await service.engine.stream_to(prepared, push)
        return outcome

    async def cancel_all(self, reason: str | None = None) -> None:
        """Cancel every request of this stream (it ended, or the drain deadline passed),
        telling the gateway `reason` when there is one; returns once all have unwound."""
        tasks = list(self.tasks.items())
        for rid, task in tasks:
            task.cancel()
            if reason:
                self.push(
                    request_id=rid,
                    finish_reason="error",
                    error=replica_pb2.RequestError(code=UNAVAILABLE, message=reason),
                )
        if tasks:
            await asyncio.gather(*(t for _, t in tasks), return_exceptions=True)
