"""uvicorn's httptools protocol with the three additions the gateway relies on.

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

uvicorn builds one protocol per connection from what `Config(http=...)` holds;
`protocol_factory` gives it the class with the settings bound. The factory is
a `functools.partial` of a module-level class, so it pickles into the worker
processes of `--workers N` (uvicorn spawns them with the Config).
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TRANSPORT_KEY = "mss.transport"


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


class GatewayHttpProtocol(HttpToolsProtocol):
    """One client connection; `send_buffer_bytes` bounds its kernel send buffer."""

    def __init__(self, *args: Any, send_buffer_bytes: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.send_buffer_bytes = send_buffer_bytes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        tune_socket(transport, self.send_buffer_bytes)
        super().connection_made(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions: dict[str, Any] = {TRANSPORT_KEY: self.transport}
        self.scope["extensions"] = extensions


def protocol_factory(send_buffer_bytes: int) -> Callable[..., GatewayHttpProtocol]:
    """What to pass as `uvicorn.Config(http=...)`: the protocol with its settings bound."""
    return functools.partial(GatewayHttpProtocol, send_buffer_bytes=send_buffer_bytes)
