"""Follows the controller's routing table over the `WatchRoutes` stream.

The gateway routes from the last table it holds; this watcher only replaces
that table when a newer one arrives. When the controller is down or the
stream breaks, the watcher reconnects forever with a capped backoff and sends
the version it holds, so the controller answers with the current table only if
it is newer. The data path never waits on the controller.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

import grpc

from mss.rpc import WATCH_CHANNEL_OPTIONS
from mss.rpc_auth import channel, describe
from mss.security import Credentials
from protos import controller_pb2, controller_pb2_grpc

log = logging.getLogger(__name__)


class RouteWatcher:
    """Calls `on_table` with every newer routing table, reconnecting as needed."""

    def __init__(
        self,
        controller_address: str,
        on_table: Callable[[controller_pb2.RoutingTable], None],
        creds: Credentials,
        watcher_id: str | None = None,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.controller_address = controller_address
        self.on_table = on_table
        self.creds = creds
        self.watcher_id = watcher_id or f"gateway-{socket.gethostname()}-{os.getpid()}"
        self.max_backoff_s = max_backoff_s
        self.version = 0
        """Version of the last table handed to `on_table` (0: none yet)."""
        self.connected = False

    async def run(self) -> None:
        """Watch until cancelled."""
        backoff = 0.1
        async with channel(
            self.controller_address, self.creds, "controller", WATCH_CHANNEL_OPTIONS
        ) as watch_channel:
            stub = controller_pb2_grpc.ControllerStub(watch_channel)
            while True:
                try:
                    await self._follow(stub)
                    log.warning("routing stream from %s ended", self.controller_address)
                except grpc.aio.AioRpcError as exc:
                    if self.connected or backoff == 0.1:
                        log.warning(
                            "routing stream from %s failed (%s); keeping table v%d meanwhile",
                            self.controller_address,
                            describe(exc),
                            self.version,
                        )
                if self.connected:
                    backoff = 0.1
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def _follow(self, stub: controller_pb2_grpc.ControllerStub) -> None:
        call = stub.WatchRoutes(
            controller_pb2.WatchRoutesRequest(
                known_version=self.version, watcher_id=self.watcher_id
            ),
            metadata=self.creds.metadata(),
        )
        try:
            await call.initial_metadata()  # the controller sends it as soon as it accepts
            self.connected = True
            log.info("watching routes from %s (holding v%d)", self.controller_address, self.version)
            async for table in call:
                if table.version == self.version:
                    continue
                self.version = table.version
                self.on_table(table)
        finally:
            call.cancel()
