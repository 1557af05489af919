"""One generation request, from admission to its last byte: the data plane of the gateway.

`Gateway.serve` has read the request and found its model; `GenerationService.run`
takes it from there: the API key's limits, the client's concurrency limit and
the model's admission queue, replica choice with retries, and the stream (or
the one JSON body).

The response is written straight to the ASGI `send` (no response framework in
the per-token path). The HTTP status is chosen when the first token (or the
first failure) arrives, so failures before any output are retried on another
replica or answered with a precise status. After the first token, a request
whose replica fails (its stream breaks, it drains past its deadline, its
engine dies) migrates: it is sent to another replica as a continuation, its
prompt followed by the token ids it has produced so far, and the client's
stream goes on where it stopped (`_migrate`; one choice, no structured
output, bounded in attempts and waiting time). When it cannot migrate, the
stream ends with an explicit error event: never silent truncation, never
duplicated text.

A deterministic request of a deployment with the response cache or coalescing
on is served by `gateway.shared_generation` instead (a cache hit, or a
generation identical requests share), through the same response writers.

Cancellation has one path: the client leaving (the connection's callback, or a
watcher on `receive` under another server) or being dropped as too slow
releases the request's sink, which sends a CancelRequest on the replica
stream; the replica aborts the engine request.
Slots and counters are given back in `finally`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from typing import Any

import grpc
import orjson

from gateway import api_keys, metrics
from gateway.admission import ClientLimiter, ModelAdmission
from gateway.api_models import GenerationInput
from gateway.errors import ApiError
from gateway.http_protocol import ARRIVED_KEY, TRANSPORT_KEY, request_cycle
from gateway.migration import (
    MAX_MIGRATIONS,
    MIGRATABLE,
    MIGRATION_POLL_S,
    MIGRATION_WAIT_S,
    continuation,
    migratable,
    pick_elsewhere,
    still_failing,
)
from gateway.replica_client import Output, ReplicaClient, RequestSink
from gateway.request_flow import (
    ClientGone,
    Flow,
    GenerationRequest,
    Lease,
    build_request,
    request_charge,
)
from gateway.response_cache import ResponseCache
from gateway.routing_table import ModelRouter
from gateway.shared_generation import (
    Deterministic,
    Serve,
    SharedGenerations,
    deterministic,
    request_key,
)
from gateway.sse import StreamFormat
from mss.rpc import status_name, status_number
from protos import replica_pb2

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Any
Send = Any

_RETRYABLE = {
    status_number(grpc.StatusCode.UNAVAILABLE),
    status_number(grpc.StatusCode.RESOURCE_EXHAUSTED),
}
"""Failures before the first token that another replica may not have."""
_STATUS_FOR_CODE = {
    status_number(grpc.StatusCode.INVALID_ARGUMENT): 400,
    status_number(grpc.StatusCode.OUT_OF_RANGE): 400,
    status_number(grpc.StatusCode.RESOURCE_EXHAUSTED): 503,
    status_number(grpc.StatusCode.UNAVAILABLE): 503,
    status_number(grpc.StatusCode.DEADLINE_EXCEEDED): 504,
}
"""HTTP status of a replica's gRPC status; any other is 502."""
_FIELD_RE = re.compile(r"([A-Za-z_][\w.\[\]]*): ")
"""A replica's refusal names its field first."""
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def replica_error(code: int, message: str) -> ApiError:
    """The HTTP answer to a replica's failure (gRPC status number `code`) before any output.

    A refusal's message starts with the field at fault (`logit_bias: ...`), which
    becomes the error's `param`.
    """
    status = _STATUS_FOR_CODE.get(code, 502)
    retry_after = 1.0 if status == 503 else None
    param = None
    if status == 400:
        match = _FIELD_RE.match(message)
        param = match.group(1) if match else None
    return ApiError(status, message, param=param, code=status_name(code), retry_after=retry_after)


def _cannot_write(body: bytes) -> bool:
    """The synchronous write of a connection that has none: the token takes the task's path."""
    return False


def _dropped_while_writing(flow: Flow) -> bool:
    """True when a cancelled write was the watchdog dropping a slow client (not a shutdown)."""
    task = asyncio.current_task()
    if flow.dropped and task is not None and task.uncancel() == 0:
        flow.leave()
        return True
    return False


class GenerationService:
    """Runs generations; holds the flows in progress for the slow-client watchdog."""

    def __init__(
        self,
        *,
        retries: int,
        buffer_chunks: int,
        slow_client_timeout_s: float,
        limiter: ClientLimiter,
        cache: ResponseCache | None = None,
    ) -> None:
        self.retries = retries
        self.buffer_chunks = buffer_chunks
        self.slow_client_timeout_s = slow_client_timeout_s
        self.limiter = limiter
        self.flows: set[Flow] = set()
        self.shared = SharedGenerations(self, cache)

    async def run(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        router: ModelRouter,
        request: GenerationRequest,
    ) -> int:
        """Serve one generation; returns the HTTP status sent (499: the client left).

        Raises ApiError only before any byte was sent (429, 503, a replica's
        failure before the first token); the caller answers it. A request under
        an API key answers with the key's `x-ratelimit-*` headers.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        inp, fmt, client_key, key = request.inp, request.fmt, request.client_key, request.key
        headers = [(b"x-request-id", fmt.request_id.encode())]
        extensions = scope.get("extensions") or {}
        # Latencies count from the request's first bytes when the server says when that was
        # (the gateway's own does), so they include reading and parsing it.
        arrived = extensions.get(ARRIVED_KEY, started)
        cycle = request_cycle(extensions)
        write_now = None if cycle is None else cycle.write_now
        flow = Flow(router.name, extensions.get(TRANSPORT_KEY), write_now)
        flow.task = asyncio.current_task()
        if key is not None:
            headers += api_keys.admit(key)
        try:
            self.limiter.acquire(client_key)
        except ApiError:
            if key is not None:
                api_keys.finish(key, 0)
            raise
        # The gateway's own server calls back when the client goes; any other (in-process
        # test clients) is watched by a task waiting on `receive`.
        watch = None if cycle is None else cycle.watch_disconnect
        watcher = None
        if watch is not None:
            watch(flow.leave)
        else:
            watcher = asyncio.create_task(self._watch(receive, flow), name="disconnect-watch")
        self.flows.add(flow)
        try:
            req = build_request(inp, fmt.request_id, request.max_tokens)
            # Only a stop string makes a replica hold text back from its deltas.
            output = Output(count_text=bool(inp.sampling.stop)) if migratable(inp) else None
            if (router.cache_ttl_s or router.coalesce) and deterministic(inp.sampling):
                cache_key = request_key(router.name, req)
                det = Deterministic(req, inp, output, cache_key, scope.get("headers") or ())
                serve = self._server(inp, fmt)
                return await self.shared.serve(
                    serve, send, router, det, fmt, flow, arrived, headers
                )
            await self._admit(router.admission, flow)
            try:
                router.metrics.queue.observe(loop.time() - started)
                blocks = router.prompt_blocks(inp)
                client, sink = await self._first(router, req, inp.session_key, flow, output, blocks)
                lease = Lease(client, sink, req, output, inp.session_key, blocks=blocks)
                flow.charge = request_charge(req)
                try:
                    serve = self._server(inp, fmt)
                    return await serve(send, router, lease, fmt, flow, arrived, headers)
                finally:
                    if lease.release():
                        router.metrics.aborts.inc()
            finally:
                router.admission.release()
        except ClientGone:
            router.metrics.disconnects.inc()
            return 499
        finally:
            self.flows.discard(flow)
            self.limiter.release(client_key)
            if key is not None:
                api_keys.finish(key, flow.charge)
            if watcher is not None:
                watcher.cancel()
            elif watch is not None:
                watch(None)

    def _server(self, inp: GenerationInput, fmt: StreamFormat) -> Serve:
        """How the response is written: one JSON body, the lean token stream or the rich one."""
        if not inp.stream:
            return self._collect
        return self._stream if fmt.lean else self._stream_rich

    async def _watch(self, receive: Receive, flow: Flow) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                flow.leave()
                return

    async def _admit(self, admission: ModelAdmission, flow: Flow) -> None:
        if admission.try_acquire():
            return
        waiting = asyncio.ensure_future(admission.acquire())
        gone = asyncio.ensure_future(flow.gone_event.wait())
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if waiting.done():
            waiting.result()  # raises the 503 when the queue is full
            if flow.gone:
                admission.release()
                raise ClientGone
            return
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        raise ClientGone

    async def _first(
        self,
        router: ModelRouter,
        req: replica_pb2.GenerateRequest,
        key: str | None,
        flow: Flow,
        output: Output | None,
        blocks: Sequence[int] = (),
    ) -> tuple[ReplicaClient, RequestSink]:
        """Submit to a replica and wait for its first output, retrying failures elsewhere.

        `output`, when the request may migrate, records what the chosen replica produces;
        `blocks` are the prompt's block hashes for the strategy (`ModelRouter.prompt_blocks`).
        """
        loop = asyncio.get_running_loop()
        base_id = req.request_id
        exclude: set[str] = set()
        failure: tuple[int, str] | None = None
        for attempt in range(self.retries + 1):
            client = pick_elsewhere(router, key, exclude, exclude, blocks)
            if client is None:
                break
            if attempt:
                router.metrics.retries.inc()
                req.request_id = f"{base_id}.{attempt}"
            submitted = loop.time()
            sink = client.submit(req, self.buffer_chunks)
            sink.output = output
            flow.sink = sink
            try:
                while not sink.items and not flow.gone:
                    await sink.wait()
            except BaseException:
                client.release(sink)
                raise
            if flow.gone:
                client.release(sink)
                router.metrics.aborts.inc()
                raise ClientGone
            first = sink.items[0]
            if first.finish_reason != "error":
                client.stats.observe_ttft(loop.time() - submitted)
                return client, sink
            client.release(sink)
            failure = (first.error.code, first.error.message or "replica error")
            if first.error.code not in _RETRYABLE:
                break
            exclude.add(client.replica_id)
            log.info(
                "attempt %d on %s failed before the first token: %s",
                attempt + 1,
                client.replica_id,
                failure[1],
            )
        if failure is None:
            raise ApiError(
                503,
                f"model {router.name!r} has no ready replica; retry later",
                code="no_replica",
                retry_after=1.0,
            )
        raise replica_error(*failure)

    async def _migrate(
        self, router: ModelRouter, lease: Lease, flow: Flow, failure: replica_pb2.RequestDelta
    ) -> bool:
        """Continue a request whose replica failed after output began on another replica.

        `failure` is the request's last delta so far; True when it was an error and the
        request goes on (its deltas now arrive in `lease.sink`); False when it
        cannot move (not a failure of the replica, a request that cannot migrate, out
        of attempts, or no replica ready within the wait), and the caller ends it
        with `failure`. Raises ClientGone when the client leaves while it waits.
        """
        output = lease.output
        code = failure.error.code
        if failure.finish_reason != "error" or output is None or code not in MIGRATABLE:
            return False
        failed = lease.client
        lease.release()
        if failed is not None:
            lease.exclude.add(failed.replica_id)
        reason = status_name(code)
        left = lease.request.sampling.max_tokens - len(output.token_ids)
        if lease.migrations >= MAX_MIGRATIONS or (lease.request.sampling.max_tokens and left <= 0):
            metrics.MIGRATIONS.labels(router.name, reason, "gave_up").inc()
            return False
        loop = asyncio.get_running_loop()
        started = loop.time()
        # A replica that failed this request is skipped until it is back in rotation
        # with a clean record (a restarted replica may serve the rest).
        key, failed_ids = lease.session_key, lease.exclude
        client = pick_elsewhere(
            router, key, still_failing(router, failed_ids), failed_ids, lease.blocks
        )
        while client is None:
            if flow.gone:
                raise ClientGone
            if lease.waited + loop.time() - started >= MIGRATION_WAIT_S:
                metrics.MIGRATIONS.labels(router.name, reason, "gave_up").inc()
                log.warning("no replica to continue on within %.0f s", MIGRATION_WAIT_S)
                return False
            await asyncio.sleep(MIGRATION_POLL_S)
            client = pick_elsewhere(
                router, key, still_failing(router, failed_ids), failed_ids, lease.blocks
            )
        lease.waited += loop.time() - started
        lease.migrations += 1
        base = lease.request.request_id
        request = continuation(lease.request, output, f"{base}.m{lease.migrations}")
        sink = client.submit(request, self.buffer_chunks)
        sink.output = output
        sink.completion_offset = len(output.token_ids)
        lease.client, lease.sink = client, sink
        flow.sink = sink
        metrics.MIGRATIONS.labels(router.name, reason, "moved").inc()
        log.info(
            "%s failed after %d tokens (%s); continuing on %s",
            failed.replica_id if failed is not None else "replica",
            len(output.token_ids),
            failure.error.message,
            client.replica_id,
        )
        return True

    async def _write(self, send: Send, flow: Flow, body: bytes, more: bool) -> None:
        flow.send_started = asyncio.get_running_loop().time()
        try:
            await send({"type": "http.response.body", "body": body, "more_body": more})
        except asyncio.CancelledError:
            if not _dropped_while_writing(flow):
                raise
        finally:
            flow.send_started = 0.0

    async def _stream(
        self,
        send: Send,
        router: ModelRouter,
        lease: Lease,
        fmt: StreamFormat,
        flow: Flow,
        arrived: float,
        headers: list[tuple[bytes, bytes]],
    ) -> int:
        # The per-token loop: kept flat (no helper coroutines) since it runs once per
        # token per stream. Once the first token is out, tokens that arrive while this
        # loop waits are written by the replica stream's flusher itself (`direct`, through
        # the connection's `write_now`, once per reply): no wake of this task per token
        # while the client keeps up. A finish, an error, a client whose buffer is full or
        # tokens behind others still queued come here.
        m = router.metrics
        token = fmt.token
        sink = lease.sink
        take = sink.take
        observe_itl = m.itl.observe
        loop_time = asyncio.get_running_loop().time
        write_now = flow.write_now or _cannot_write
        last = 0.0

        def direct(deltas: list[replica_pb2.RequestDelta]) -> bool:
            nonlocal last
            body = b"".join([token(d.text) for d in deltas if d.text])
            if body:
                if not write_now(body):
                    return False
                now = loop_time()
                observe_itl(now - last)
                last = now
            return True

        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + headers})
        parts: list[bytes] = [fmt.first()]
        try:
            while True:
                finish: replica_pb2.RequestDelta | None = None
                for delta in take():
                    if delta.finish_reason:
                        finish = delta  # its text goes out with the finish reason
                    elif delta.text:
                        parts.append(token(delta.text))
                if finish is not None and await self._migrate(router, lease, flow, finish):
                    finish = None
                    sink = lease.sink
                    take = sink.take
                if finish is not None or sink.overflowed:
                    sink.direct = None
                    return await self._end_stream(
                        send, router, sink, fmt, flow, parts, finish, arrived
                    )
                if parts:
                    now = flow.send_started = loop_time()
                    body = b"".join(parts)
                    parts = []
                    try:
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                    except asyncio.CancelledError:
                        if not _dropped_while_writing(flow):
                            raise
                    flow.send_started = 0.0
                    if last:
                        observe_itl(now - last)
                    else:
                        m.ttft.observe(now - arrived)
                    last = now
                if flow.gone:
                    raise ClientGone
                if not sink.items and not sink.ended:
                    if flow.write_now is not None and last:
                        sink.direct = direct
                    await sink.arm()
                    if flow.gone:
                        raise ClientGone
        finally:
            sink.direct = None

    async def _end_stream(
        self,
        send: Send,
        router: ModelRouter,
        sink: RequestSink,
        fmt: StreamFormat,
        flow: Flow,
        parts: list[bytes],
        finish: replica_pb2.RequestDelta | None,
        arrived: float,
    ) -> int:
        loop = asyncio.get_running_loop()
        m = router.metrics
        if finish is None or finish.finish_reason == "error":
            if finish is None:
                message = "the client read too slowly; the request was aborted"
                log.warning("dropping slow reader: stream buffer full")
                status = 429
            else:
                message = f"generation failed after output began: {finish.error.message}"
                log.warning("%s", message)
                status = replica_error(finish.error.code, message).status
            parts.append(fmt.error(message, status))
        else:
            parts.append(fmt.final(finish) if fmt.lean else fmt.end(finish))
            flow.charge = fmt.output_tokens(finish)
            m.prompt_tokens.inc(finish.prompt_tokens)
            m.output_tokens.inc(flow.charge)
        await self._write(send, flow, b"".join(parts), False)
        if flow.gone:
            raise ClientGone
        m.e2e.observe(loop.time() - arrived)
        return 200

    async def _stream_rich(
        self,
        send: Send,
        router: ModelRouter,
        lease: Lease,
        fmt: StreamFormat,
        flow: Flow,
        arrived: float,
        headers: list[tuple[bytes, bytes]],
    ) -> int:
        """`_stream` for formats that are not lean (n choices, logprobs, tools...).

        Each delta becomes its chunks through `fmt.feed`; the request is over
        when all n choices finished, or at the first error.
        """
        m = router.metrics
        feed = fmt.feed
        loop_time = asyncio.get_running_loop().time
        n = fmt.n
        sink = lease.sink
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + headers})
        parts: list[bytes] = []
        last = 0.0
        while True:
            finish: replica_pb2.RequestDelta | None = None
            for delta in sink.take():
                if delta.finish_reason == "error":
                    finish = delta
                    break
                parts.append(feed(delta))
                if fmt.finished >= n:
                    finish = delta
                    break
            if finish is not None and await self._migrate(router, lease, flow, finish):
                finish = None
                sink = lease.sink
            if finish is not None or sink.overflowed:
                return await self._end_stream(send, router, sink, fmt, flow, parts, finish, arrived)
            if parts:
                now = flow.send_started = loop_time()
                body = b"".join(parts)
                parts = []
                try:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                except asyncio.CancelledError:
                    if not _dropped_while_writing(flow):
                        raise
                flow.send_started = 0.0
                if last:
                    m.itl.observe(now - last)
                else:
                    m.ttft.observe(now - arrived)
                last = now
            if flow.gone:
                raise ClientGone
            if not sink.items and not sink.ended:
                await sink.arm()
                if flow.gone:
                    raise ClientGone

    async def _collect(
        self,
        send: Send,
        router: ModelRouter,
        lease: Lease,
        fmt: StreamFormat,
        flow: Flow,
        arrived: float,
        headers: list[tuple[bytes, bytes]],
    ) -> int:
        loop = asyncio.get_running_loop()
        finish: replica_pb2.RequestDelta | None = None
        n = fmt.n
        while finish is None:
            for delta in lease.sink.take():
                if delta.finish_reason == "error":
                    finish = delta
                    break
                fmt.add(delta)
                if delta.finish_reason and fmt.finished >= n:
                    finish = delta
                    break
            if finish is not None and await self._migrate(router, lease, flow, finish):
                finish = None
            if finish is None:
                if flow.gone:
                    raise ClientGone
                await lease.sink.wait()
        if finish.finish_reason == "error":
            raise replica_error(finish.error.code, f"generation failed: {finish.error.message}")
        body = orjson.dumps(fmt.body(finish))
        m = router.metrics
        m.ttft.observe(loop.time() - arrived)
        flow.charge = fmt.output_tokens(finish)
        m.prompt_tokens.inc(finish.prompt_tokens)
        m.output_tokens.inc(flow.charge)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await self._write(send, flow, body, False)
        m.e2e.observe(loop.time() - arrived)
        return 200

    async def close(self) -> None:
        """Let shared generations finish their cache writes (bounded), then cancel the rest."""
        await self.shared.close()

    async def watchdog(self) -> None:
        """Drop slow clients every quarter timeout (at least once a second) until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.slow_client_timeout_s / 4))
            self.drop_slow_clients(loop.time())

    def drop_slow_clients(self, now: float) -> None:
        """Drop clients whose pending write began more than the timeout before `now` (loop time)."""
        timeout = self.slow_client_timeout_s
        for flow in list(self.flows):
            if flow.send_started and not flow.dropped and now - flow.send_started > timeout:
                self._drop(flow)

    def _drop(self, flow: Flow) -> None:
        log.warning(
            "dropping a client of %s that read nothing for %.1f s",
            flow.model,
            self.slow_client_timeout_s,
        )
        flow.dropped = True
        flow.leave()
        if flow.transport is not None:
            flow.transport.abort()
        elif flow.task is not None:
            flow.task.cancel()
