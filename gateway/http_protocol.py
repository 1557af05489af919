"""uvicorn's httptools protocol with two additions the gateway relies on.

- TCP_NODELAY on every client socket, set here rather than trusted to the
  event loop: without it small SSE writes wait for the peer's delayed ACK and
  the first token arrives tens of milliseconds late.
- A bounded kernel send buffer (`client_send_buffer_bytes`): with autotuning
  a reader that stopped can absorb megabytes before the gateway notices.
- The connection's transport in `scope["extensions"]["mss.transport"]`, so the
  slow-client watchdog can abort a connection whose reader stopped: that
  unblocks the handler's pending write and ends the request through the
  ordinary disconnect path.

Selected with `uvicorn.Config(http="gateway.http_protocol:GatewayHttpProtocol")`.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TRANSPORT_KEY = "mss.transport"
send_buffer_bytes = 0
"""SO_SNDBUF for client sockets, set from GatewaySettings when the app is created (0: leave it)."""


def tune_socket(transport: asyncio.BaseTransport) -> None:
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
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        tune_socket(transport)
        super().connection_made(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions: dict[str, Any] = {TRANSPORT_KEY: self.transport}
        self.scope["extensions"] = extensions
