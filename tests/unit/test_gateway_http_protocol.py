"""The client-connection protocol: settings bound for workers, its answers, HTTP/1.0 framing,
the disconnect callback."""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.server import ServerState

from gateway.errors import ApiError
from gateway.http_protocol import (
    WATCH_DISCONNECT_KEY,
    CloseDelimitedCycle,
    ConnectionLimits,
    GatewayHttpProtocol,
    error_response,
    protocol_factory,
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
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

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


REQUEST = b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{}"


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
        return protocol, scope["extensions"][WATCH_DISCONNECT_KEY]

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
