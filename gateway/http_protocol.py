"""uvicorn's httptools protocol with what the gateway adds per client connection.

- TCP_NODELAY on every client socket, set here rather than trusted to the
  event loop: without it small SSE writes wait for the peer's delayed ACK and
  the first token arrives tens of milliseconds late.
- A bounded kernel send buffer (`send_buffer_bytes`, from
  `GatewaySettings.client_send_buffer_bytes`): with autotuning a reader that
  stopped can absorb megabytes before the gateway notices.
- The connection's transport in `scope["extensions"]["mss.transport"]`, so the
  slow-client watchdog can abort a connection whose reader stopped: that
  unblocks the handler's pending write and ends the request through the
  ordinary disconnect path.
- The request's cycle, by weak reference, in `scope["extensions"]["mss.cycle"]`
  (`request_cycle`), for two things uvicorn's lacks. A callback when the
  client goes (`GatewayCycle.watch_disconnect`): a request in progress learns
  of it without a task of its own waiting on `receive`. A synchronous write
  of a stream's next chunk (`GatewayCycle.write_now`): the replica stream's
  reader writes a stream's tokens to its client once per reply, without
  waking the request's handler, while the client keeps up.
- Limits on what a client may hold (`ConnectionLimits`): a request head must
  arrive within `header_timeout_s` of connecting or of its first byte, and
  within `MAX_HEAD_BYTES`; a body within `body_timeout_s` of its head; past
  `max_connections` open connections in this process, a new one is answered
  503 and closed. uvicorn has none of these (its keep-alive timeout, set from
  `idle_timeout_s` in `gateway.main`, runs only between requests), so a
  client that opens connections and never finishes a request (slowloris)
  would hold them forever. No timer runs while a response streams: once the
  request is in, only the slow-client watchdog watches the connection.
- HTTP/1.0 answered in HTTP/1.0's framing: a response of unknown length (a
  stream) is sent as is and ends when the connection closes, never chunked,
  which an HTTP/1.0 client cannot decode.

uvicorn builds one protocol per connection from what `Config(http=...)` holds;
`protocol_factory` gives it the class with the settings bound. The factory is
a `functools.partial` of a module-level class, so it pickles into the worker
processes of `--workers N` (uvicorn spawns them with the Config).
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import socket
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway import metrics
from gateway.errors import ApiError, send_error

log = logging.getLogger("gateway")

TRANSPORT_KEY = "mss.transport"
CYCLE_KEY = "mss.cycle"
"""A weak reference to the request's `GatewayCycle` (`request_cycle` reads it). The cycle
holds the scope, so a strong one would make each request a reference cycle, which only the
garbage collector's rare full passes free: at a thousand requests a second they pile up by
the thousands and a full pass stalls every stream for over a hundred milliseconds."""
ARRIVED_KEY = "mss.arrived"
"""Loop time when the request's first bytes were parsed: what latency metrics count from,
so they include reading, parsing and validating the request."""
MAX_HEAD_BYTES = 64 * 1024
"""Request target plus header names and values; a longer head is answered 431 (nginx allows
32 KiB). While a head arrives over several chunks, all their bytes count."""


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may hold; `GatewaySettings` gives the values."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 10_000


def request_cycle(extensions: dict[str, Any]) -> GatewayCycle | None:
    """The request's cycle (`CYCLE_KEY`), or None under another server. Alive while the
    request's app runs: the task running it holds the cycle."""
    ref = extensions.get(CYCLE_KEY)
    return None if ref is None else ref()


def tune_socket(transport: asyncio.BaseTransport, send_buffer_bytes: int) -> None:
    """TCP_NODELAY, and SO_SNDBUF when `send_buffer_bytes` is not 0 (0: the kernel's)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if send_buffer_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    except OSError:
        pass


def error_response(exc: ApiError) -> bytes:
    """`exc` as a whole HTTP response that closes the connection, for answers written before
    (or instead of) the app: a head that timed out or is too large."""
    body = exc.body()
    head = [b"HTTP/1.1 %d %s\r\n" % (exc.status, http.HTTPStatus(exc.status).phrase.encode())]
    head += [b"%s: %s\r\n" % header for header in exc.headers()]
    head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    return b"".join(head) + body


async def _over_capacity(scope: Any, receive: Any, send: Any) -> None:
    """The app of a connection past `max_connections`: 503, and the connection closes."""
    err = ApiError(
        503,
        "too many open connections to this gateway; retry later",
        code="connections",
        retry_after=1,
    )
    await send_error(send, err, (b"connection", b"close"))


def _framed(message: Any, method: str) -> bool:
    """Whether a response start says its own length (or has no body), so needs no framing."""
    if method == "HEAD" or message["status"] in (204, 304) or message["status"] < 200:
        return True
    return any(
        name.lower() in (b"content-length", b"transfer-encoding")
        for name, _ in message.get("headers", ())
    )


class _HeadHold:
    """A cycle's transport while uvicorn writes a response's head: the head is kept."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.head = b""

    def write(self, data: bytes) -> None:
        self.head += data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _Prefixed:
    """A cycle's transport while uvicorn writes the first body chunk after a held head: the
    head goes out in front of it, in the same write (or alone, before a close)."""

    def __init__(self, transport: asyncio.Transport, head: bytes) -> None:
        self.transport = transport
        self.head = head

    def write(self, data: bytes) -> None:
        head, self.head = self.head, b""
        self.transport.write(head + data)

    def flush(self) -> None:
        if self.head:
            self.write(b"")

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class GatewayCycle(RequestResponseCycle):
    """uvicorn's cycle with a synchronous write for the token path (`write_now`), a
    callback for the client leaving (`watch_disconnect`), and a response's head written
    together with the first chunk of its body when that follows at once: one write and
    one TCP segment less per response (`send`)."""

    close_delimited = False
    on_disconnect: Callable[[], None] | None = None
    held_head = b""
    """A response head not written yet: it goes out in front of the next write, or at the
    next turn of the event loop when none came (`_flush_head`)."""

    async def send(self, message: Any) -> None:
        if self.held_head:
            transport = self.transport
            prefixed = _Prefixed(transport, self._take_head())
            self.transport = prefixed  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
                if not self.disconnected:
                    prefixed.flush()  # a body uvicorn does not write (HEAD)
            return
        if message["type"] != "http.response.start" or self.response_started:
            await super().send(message)
            return
        transport = self.transport
        hold = _HeadHold(transport)
        self.transport = hold  # type: ignore[assignment]
        try:
            await super().send(message)
        finally:
            self.transport = transport
        if hold.head:
            self.held_head = hold.head
            asyncio.get_running_loop().call_soon(self._flush_head)

    def _take_head(self) -> bytes:
        head, self.held_head = self.held_head, b""
        return head

    def _flush_head(self) -> None:
        if self.held_head and not self.disconnected:
            self.transport.write(self._take_head())

    def watch_disconnect(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` once if the connection is lost before the response ended (at once
        when it was already); None stops watching. What a handler's task waiting on
        `receive` for `http.disconnect` would learn, without the task."""
        if callback is not None and self.disconnected:
            callback()
            return
        self.on_disconnect = callback

    def write_now(self, body: bytes) -> bool:
        """Write a chunk of a started streaming response at once, without awaiting; False
        when it has to go through `send` instead: the client's buffer is over its high
        mark (`send` waits for it to drain), the connection is gone, or the response is
        not a stream (uvicorn's own checks then apply)."""
        if self.flow.write_paused or self.disconnected or self.response_complete:
            return False
        if self.chunked_encoding:
            data = b"%x\r\n%b\r\n" % (len(body), body)
        elif self.close_delimited:
            data = body
        else:
            return False
        if self.held_head:
            data = self._take_head() + data
        self.transport.write(data)
        return True


class CloseDelimitedCycle(GatewayCycle):
    """The cycle of an HTTP/1.0 request: a response of unknown length goes out unframed and
    ends when the connection closes. uvicorn would send it chunked, which HTTP/1.0 lacks.

    uvicorn closes every HTTP/1.0 connection after its response (and says so in a
    `connection: close` header); a response with a content-length is uvicorn's as is.
    """

    async def send(self, message: Any) -> None:
        if not self.response_started and message["type"] == "http.response.start":
            if not _framed(message, self.scope["method"]):
                self.chunked_encoding = False  # uvicorn adds chunked framing only when None
                self.close_delimited = True
            await super().send(message)
            return
        if not self.close_delimited or message["type"] != "http.response.body":
            await super().send(message)
            return
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected or self.response_complete:
            return
        body = message.get("body", b"")
        self.transport.write(self._take_head() + body if self.held_head else body)
        if not message.get("more_body", False):
            self.response_complete = True
            self.message_event.set()
            self.transport.close()
            self.on_response()


class GatewayHttpProtocol(HttpToolsProtocol):
    """One client connection; `send_buffer_bytes` bounds its kernel send buffer, `limits`
    what it may hold."""

    def __init__(
        self,
        *args: Any,
        send_buffer_bytes: int = 0,
        limits: ConnectionLimits = ConnectionLimits(),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.send_buffer_bytes = send_buffer_bytes
        self.limits = limits
        self.deadline: asyncio.TimerHandle | None = None
        """The head's or the body's timeout, whichever phase the request is in."""
        self.head_bytes = -1
        """Bytes of the current request's head in the chunks before the one being parsed
        (separators included); -1 between requests. A head that came in several chunks is
        measured exactly (`_head_size`) once it is in."""
        self.chunk_bytes = 0
        """The size of the chunk being parsed."""
        self.ended_in_chunk = False
        """A request ended in the chunk being parsed."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        tune_socket(transport, self.send_buffer_bytes)
        over = len(self.connections) >= self.limits.max_connections
        super().connection_made(transport)
        if over:
            # Not counted: it ends once its head is in (or times out) and holds no request.
            self.connections.discard(self)
            self.app = _over_capacity
            metrics.CONNECTIONS_CLOSED.labels("over_limit").inc()
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        cycle = self.cycle
        super().connection_lost(exc)
        if isinstance(cycle, GatewayCycle) and cycle.disconnected:
            callback, cycle.on_disconnect = cycle.on_disconnect, None
            if callback is not None:
                callback()

    def data_received(self, data: bytes) -> None:
        if self.deadline is None and (self.cycle is None or self.cycle.response_complete):
            # Bytes of a next request on a kept-alive connection. A request pipelined behind
            # a response still going is not timed while it waits (uvicorn's keep-alive
            # timeout and this deadline take over once that response ends).
            self._expect_head()
        in_head = self.head_bytes >= 0
        self.chunk_bytes = len(data)
        self.ended_in_chunk = False
        super().data_received(data)
        if self.head_bytes >= 0 and not self.transport.is_closing():
            # A head still arriving. Its size is counted per chunk rather than per header
            # (no Python call per header): every byte of the chunk, unless the chunk also
            # held the end of the request before (pipelined): then what the parser took.
            whole = in_head or not self.ended_in_chunk
            self.head_bytes += len(data) if whole else self._head_size()
            if self.head_bytes > MAX_HEAD_BYTES:
                self._head_too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions: dict[str, Any] = {
            TRANSPORT_KEY: self.transport,
            ARRIVED_KEY: self.loop.time(),
        }
        self.scope["extensions"] = extensions
        self.head_bytes = 0

    def on_headers_complete(self) -> None:
        self._cancel_deadline()
        # Counted exactly when it came in several chunks or in one over the limit.
        may_be_over = self.head_bytes > 0 or self.chunk_bytes > MAX_HEAD_BYTES
        self.head_bytes = -1
        if may_be_over and self._head_size() > MAX_HEAD_BYTES:
            self._head_too_large()
        if self.transport.is_closing():  # refused while its head arrived: no app runs
            return
        pipelined = self.cycle is not None and not self.cycle.response_complete
        super().on_headers_complete()
        if not pipelined:  # a pipelined request waits unread (uvicorn pauses reading)
            self.deadline = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)
        cycle = self.cycle
        if type(cycle) is RequestResponseCycle:
            # Its task is created but has not run: it sends through the subclass.
            http10 = self.scope.get("http_version") == "1.0"
            cycle.__class__ = CloseDelimitedCycle if http10 else GatewayCycle
            assert isinstance(cycle, GatewayCycle)
            extensions: dict[str, Any] = self.scope["extensions"]  # type: ignore[assignment]
            extensions[CYCLE_KEY] = weakref.ref(cycle)

    def on_body(self, body: bytes) -> None:
        if not self.transport.is_closing():
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.ended_in_chunk = True
        self._cancel_deadline()
        if not self.transport.is_closing():
            super().on_message_complete()

    def _expect_head(self) -> None:
        self._cancel_deadline()
        self.deadline = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _head_size(self) -> int:
        """The request line's target and the headers parsed so far, names and values."""
        return len(self.url) + sum(len(name) + len(value) for name, value in self.headers)

    def _head_too_large(self) -> None:
        if not self.transport.is_closing():
            metrics.CONNECTIONS_CLOSED.labels("head_too_large").inc()
            self._refuse(ApiError(431, f"request head is over the limit of {MAX_HEAD_BYTES} bytes"))

    def _head_timed_out(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        metrics.CONNECTIONS_CLOSED.labels("header_timeout").inc()
        if self.head_bytes < 0:  # nothing of a request yet: nothing to answer
            self.transport.close()
            return
        limit = self.limits.header_timeout_s
        self._refuse(ApiError(408, f"request head not complete within {limit:g} s"))

    def _body_timed_out(self) -> None:
        self.deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None:
            return
        if cycle.response_started and not cycle.response_complete:
            return  # answered before its body was in: the response is never cut
        metrics.CONNECTIONS_CLOSED.labels("body_timeout").inc()
        if cycle.response_complete:
            self.transport.close()
            return
        limit = self.limits.body_timeout_s
        self._refuse(ApiError(408, f"request body not complete within {limit:g} s"))

    def _refuse(self, exc: ApiError) -> None:
        """Answer `exc` in place of the app and close. The request's handler, if one runs,
        sees the client gone. Behind a response still going (a pipelined head over the
        limit) no answer can be framed: the connection just closes."""
        cycle = self.cycle
        if cycle is None or not cycle.response_started or cycle.response_complete:
            self.transport.write(error_response(exc))
        self.transport.close()


def protocol_factory(
    send_buffer_bytes: int, limits: ConnectionLimits
) -> Callable[..., GatewayHttpProtocol]:
    """What to pass as `uvicorn.Config(http=...)`: the protocol with its settings bound."""
    return functools.partial(
        GatewayHttpProtocol, send_buffer_bytes=send_buffer_bytes, limits=limits
    )
