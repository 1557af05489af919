"""The client-connection protocol: its settings arrive bound, not through a module global."""

from __future__ import annotations

import asyncio
import pickle
import socket

from gateway.errors import ApiError
from gateway.http_protocol import (
    ConnectionLimits,
    GatewayHttpProtocol,
    error_response,
    protocol_factory,
    tune_socket,
)


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
