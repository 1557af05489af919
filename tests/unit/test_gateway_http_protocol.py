"""The client-connection protocol: its settings arrive bound, not through a module global."""

from __future__ import annotations

import asyncio
import pickle
import socket

from gateway.http_protocol import GatewayHttpProtocol, protocol_factory, tune_socket


def test_the_factory_binds_the_send_buffer_and_pickles_for_worker_processes() -> None:
    factory = protocol_factory(65_536)
    copy = pickle.loads(pickle.dumps(factory))  # uvicorn spawns workers with the pickled Config
    assert copy.func is GatewayHttpProtocol  # type: ignore[attr-defined]
    assert copy.keywords == {"send_buffer_bytes": 65_536}  # type: ignore[attr-defined]


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
