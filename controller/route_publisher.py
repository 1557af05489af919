"""Versioned routing-table snapshots and the watchers that follow them.

Each publish that changes the content makes a new whole table with the next
version; a watcher never receives a diff, so one that is behind (or was
disconnected) gets the current table at once and is up to date. Watchers wait
on an event that every publish replaces, so a slow watcher never holds others
back and no queue grows (Ray Serve's long-poll host works the same way).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence

from protos import controller_pb2 as pb

log = logging.getLogger(__name__)


class RoutePublisher:
    """Holds the current table; `publish` bumps the version only when the content changes."""

    def __init__(self, version: int = 0) -> None:
        self._version = version
        self._table: pb.RoutingTable | None = None
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def version(self) -> int:
        return self._version

    @property
    def table(self) -> pb.RoutingTable | None:
        """The current table, None until the first publish after start."""
        return self._table

    def publish(self, models: Sequence[pb.ModelRoutes]) -> bool:
        """Offer new content; returns True when it differed and a new version went out."""
        if self._table is not None and list(self._table.models) == list(models):
            return False
        self._stamp(models)
        return True

    def _stamp(self, models: Sequence[pb.ModelRoutes]) -> None:
        self._version += 1
        self._table = pb.RoutingTable(version=self._version, models=list(models))
        log.info(
            "routing table v%d: %s",
            self._version,
            ", ".join(f"{m.model}={len(m.routes)}" for m in models) or "no models",
        )
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def catch_up(self, known_version: int) -> None:
        """A watcher holds a newer version than ours, so this controller lost its state.

        Gateways ignore tables older than the one they hold; jumping past the
        watcher's version makes the next table (sent at once) acceptable to all.
        """
        if known_version <= self._version:
            return
        log.warning(
            "a watcher holds routing table v%d, newer than v%d: continuing from there",
            known_version,
            self._version,
        )
        self._version = known_version
        if self._table is not None:
            self._stamp(list(self._table.models))

    def close(self) -> None:
        """End every watch stream (controller shutdown)."""
        self._closed = True
        self._changed.set()

    async def watch(self, known_version: int) -> AsyncGenerator[pb.RoutingTable, None]:
        """Yield the current table whenever it is newer than what the watcher holds."""
        self.catch_up(known_version)
        known = known_version
        while not self._closed:
            table = self._table
            if table is not None and table.version != known:
                known = table.version
                yield table
                continue
            await self._changed.wait()
