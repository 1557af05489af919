"""The client-connection protocol: settings bound for workers, its answers, HTTP/1.0 framing,
the disconnect callback."""

from __future__ import annotations

import asyncio
import gc
import logging
import pickle
import socket
import weakref
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.server import ServerState

from gateway.errors import ApiError
from gateway.http_protocol import (
    MAX_HEAD_BYTES,
    CloseDelimitedCycle,
    ConnectionLimits,
    GatewayHttpProtocol,
    error_response,
    protocol_factory,
    request_cycle,
    tune_socket,
)

SSE = [(b"content-type", b"text/event-stream")]


def test_the_factory_binds_the_settings_and_pickles_for_worker_processes() -> None:
    limits = ConnectionLimits(header_timeout_s=2.5, body_timeout_s=7.0, max_connections=9)
    factory = protocol_factory(65_536, limits)
    copy = pickle.loads(pickle.dumps(factory))  # uvicorn spawns workers with the pickled Config
    assert copy.func is GatewayHttpProtocol  # type: ignore[attr-defined]
    assert copy.keywords == {"send_buffer_bytes": 65_536, "limits": limits}  # type: ignore[attr-defined]


def test_tune_socket_sets_nodelay_and_the_send_buffer() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        default = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        transport = asyncio.BaseTransport({"socket": sock})
        tune_socket(transport, 0)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == default
        tune_socket(transport, 32_768)
        # Linux doubles the value asked for (bookkeeping overhead); others keep it.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) in (32_768, 65_536)


def test_an_error_written_by_the_protocol_is_a_whole_response_that_closes() -> None:
    raw = error_response(ApiError(408, "request head not complete within 10 s"))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 408 Request Timeout"
    assert b"connection: close" in lines and b"content-type: application/json" in lines
    assert f"content-length: {len(body)}".encode() in lines
    assert b'"type":"RequestTimeoutError"' in body and b'"code":408' in body


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def http10_cycle(transport: RecordingTransport, method: str = "POST") -> CloseDelimitedCycle:
    scope: Any = {"type": "http", "method": method, "http_version": "1.0", "path": "/"}
    return CloseDelimitedCycle(
        scope=scope,
        transport=transport,
        flow=FlowControl(transport),
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=False,  # uvicorn never keeps an HTTP/1.0 connection
        on_response=lambda: None,
    )


async def test_an_http_1_0_stream_goes_out_unframed_and_ends_by_closing() -> None:
    transport = RecordingTransport()
    cycle = http10_cycle(transport)
    start = {"type": "http.response.start", "status": 200, "headers": SSE}
    await cycle.send(start)
    await cycle.send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    assert not transport.closed
    await cycle.send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": False})
    head, _, body = transport.written.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head and b"connection: close" in head
    assert body == b"data: 1\n\ndata: 2\n\n"  # no chunk sizes
    assert transport.closed and cycle.response_complete


async def test_an_http_1_0_response_with_a_length_is_uvicorns_as_is() -> None:
    transport = RecordingTransport()
    cycle = http10_cycle(transport)
    headers = [(b"content-length", b"2")]
    await cycle.send({"type": "http.response.start", "status": 200, "headers": headers})
    await cycle.send({"type": "http.response.body", "body": b"ok"})
    head, _, body = transport.written.partition(b"\r\n\r\n")
    assert b"content-length: 2" in head and b"transfer-encoding" not in head and body == b"ok"
    assert transport.closed


async def settle(check: Callable[[], object]) -> None:
    """Let the loop run until `check` holds (at most 2 s)."""
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.01)
    assert check()


REQUEST = b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{}"


async def test_a_finished_request_s_cycle_is_freed_without_the_garbage_collector() -> None:
    """Nothing a request's scope holds refers back to its cycle, so reference counting frees
    the cycle once the next request on the connection took its place: finished requests do
    not pile up for the collector's full passes, which stall every stream."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        assert request_cycle(scope["extensions"]) is not None
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        await send({"type": "http.response.body", "body": b"data: 1\n\n"})

    config = Config(app=app, log_level="warning")
    config.load()
    protocol = GatewayHttpProtocol(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(RecordingTransport())
    gc.disable()
    try:
        protocol.data_received(REQUEST)
        await settle(lambda: protocol.cycle is not None and protocol.cycle.response_complete)
        assert protocol.cycle is not None
        first = weakref.ref(protocol.cycle)
        protocol.data_received(REQUEST)
        await settle(lambda: protocol.cycle is not first() and protocol.cycle.response_complete)
        await settle(lambda: first() is None)
    finally:
        gc.enable()


async def test_a_request_learns_of_its_client_leaving_through_the_connection() -> None:
    """`watch_disconnect` calls back once when the connection is lost mid-response, at once
    when it was lost already, and not once the handler stopped watching."""
    scopes: asyncio.Queue[Any] = asyncio.Queue()
    respond = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the body
        await scopes.put(scope)
        await respond.wait()
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        await send({"type": "http.response.body", "body": b"data: 1\n\n"})

    config = Config(app=app, log_level="warning")
    config.load()

    async def connect() -> tuple[GatewayHttpProtocol, Any]:
        protocol = GatewayHttpProtocol(config=config, server_state=ServerState(), app_state={})
        protocol.connection_made(RecordingTransport())
        protocol.data_received(REQUEST)
        scope = await asyncio.wait_for(scopes.get(), 5)
        cycle = request_cycle(scope["extensions"])
        assert cycle is not None
        return protocol, cycle.watch_disconnect

    calls: list[str] = []
    protocol, watch = await connect()
    watch(lambda: calls.append("mid-response"))
    protocol.connection_lost(None)
    assert calls == ["mid-response"]
    watch(lambda: calls.append("already gone"))
    assert calls == ["mid-response", "already gone"]

    protocol, watch = await connect()
    watch(lambda: calls.append("unwatched"))
    watch(None)
    protocol.connection_lost(None)

    respond.set()
    protocol, watch = await connect()
    watch(lambda: calls.append("after the response"))
    await asyncio.sleep(0.05)  # the handler sends its whole response
    assert protocol.cycle is not None and protocol.cycle.response_complete
    protocol.connection_lost(None)
    assert calls == ["mid-response", "already gone"]


async def test_a_head_over_the_limit_is_refused_however_it_arrives() -> None:
    """431 for a head over `MAX_HEAD_BYTES` in one chunk or many; not for a head under it,
    whatever the size of the body behind it or of the chunks."""
    started: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = Config(app=app, log_level="warning")
    config.load()

    def feed(raw: bytes, chunk: int) -> RecordingTransport:
        protocol = GatewayHttpProtocol(config=config, server_state=ServerState(), app_state={})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        for i in range(0, len(raw), chunk):
            if transport.closed:
                break
            protocol.data_received(raw[i : i + chunk])
        return transport

    def request(path: str, header_bytes: int, body: bytes = b"") -> bytes:
        return (
            f"POST /{path} HTTP/1.1\r\nhost: x\r\nx-big: {'a' * header_bytes}\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body

    over = MAX_HEAD_BYTES + 100
    for chunk in (1 << 20, 65_536, 1_000):
        transport = feed(request("over", over), chunk)
        assert transport.written.startswith(b"HTTP/1.1 431"), chunk
        assert transport.closed
    under = MAX_HEAD_BYTES - 2_000
    for chunk in (1 << 20, 1_000):
        transport = feed(request("under", under, b"x" * 300_000), chunk)
        assert not transport.written.startswith(b"HTTP/1.1 431"), chunk
    # The end of a large body and the start of the next head in one chunk: the body's bytes
    # do not count toward the next head.
    pipelined = request("first", 10, b"x" * 60_000) + request("second", 10_000)
    transport = feed(pipelined, 61_000)
    assert not transport.written.startswith(b"HTTP/1.1 431")
    # ... nor hide a head over the limit behind them.
    transport = feed(request("first", 10, b"x" * 100) + request("third", over), 60_000)
    assert b"HTTP/1.1 431" in transport.written and transport.closed
    await asyncio.sleep(0.05)
    assert sorted(started) == ["/first", "/first", "/second", "/under", "/under"]  # no "/third"


async def test_a_head_leaves_with_the_first_chunk_of_its_body() -> None:
    """One write for a head and the body chunk sent right after it; a head with no body
    behind it yet still goes out at the next turn of the loop, and a HEAD response's too."""
    go_on = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        if scope["path"] == "/wait":
            await send({"type": "http.response.start", "status": 200, "headers": SSE})
            await go_on.wait()
            await send({"type": "http.response.body", "body": b"data: 1\n\n"})
            return
        headers = [(b"content-length", b"2")] if scope["path"] == "/json" else SSE
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if scope["path"] == "/json":
            await send({"type": "http.response.body", "body": b"{}"})
            return
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: 2\n\n"})

    config = Config(app=app, log_level="warning")
    config.load()

    async def serve(method: str, path: str) -> RecordingTransport:
        protocol = GatewayHttpProtocol(config=config, server_state=ServerState(), app_state={})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(f"{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        for _ in range(20):
            await asyncio.sleep(0)
        return transport

    stream = await serve("GET", "/stream")
    assert len(stream.writes) == 2
    assert stream.writes[0].startswith(b"HTTP/1.1 200") and b"data: 1" in stream.writes[0]
    assert b"data: 2" in stream.writes[1] and stream.writes[1].endswith(b"0\r\n\r\n")
    assert len((await serve("GET", "/json")).writes) == 1
    head = await serve("HEAD", "/json")
    assert len(head.writes) == 1 and head.writes[0].startswith(b"HTTP/1.1 200")
    assert head.writes[0].endswith(b"\r\n\r\n")
    waiting = await serve("GET", "/wait")
    assert len(waiting.writes) == 1 and waiting.writes[0].startswith(b"HTTP/1.1 200")
    go_on.set()
    await asyncio.sleep(0.01)
    assert len(waiting.writes) == 2 and b"data: 1" in waiting.writes[1]
