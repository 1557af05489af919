"""Reports this gateway process's load to the controller (`ReportLoad`), the autoscaler's signal.

About once a second, and at once when a request is held at zero replicas
(`nudge`), it sends per model the requests in flight, queued and held, and the
time-to-first-token p95 of the requests that got their first token since the
last report (read from the TTFT histogram's buckets, as Prometheus'
`histogram_quantile` would). Reports are off the data path: a failed one is
logged once and the next one tries again; the controller forgets a gateway
whose reports stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Sequence

import grpc

from gateway.metrics import BatchedHistogram
from gateway.routing_table import RoutingTable
from mss.rpc import UNARY_CHANNEL_OPTIONS
from mss.rpc_auth import channel, describe
from mss.security import Credentials
from protos import controller_pb2, controller_pb2_grpc

log = logging.getLogger(__name__)


def quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float:
    """The q-quantile of observations counted per bucket (non-cumulative `counts`, upper
    `bounds`), interpolated within its bucket; the last finite bound for the +Inf bucket."""
    total = sum(counts)
    if not total:
        return 0.0
    rank = q * total
    seen = 0.0
    lower = 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count and seen + count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - seen) / count
        seen += count
        if bound != float("inf"):
            lower = bound
    return lower


class TtftWindow:
    """The TTFT p95 of one model since the previous call, from its histogram's buckets."""

    def __init__(self) -> None:
        self._last: list[float] | None = None

    def take(self, batch: BatchedHistogram) -> tuple[float, int]:
        """(p95 seconds, observations) since the last call; (0, 0) when there were none."""
        batch.flush()
        child = batch.child
        bounds: list[float] = list(child._upper_bounds)  # type: ignore[attr-defined]
        now = [b.get() for b in child._buckets]  # type: ignore[attr-defined]
        last, self._last = self._last, now
        if last is None:
            return 0.0, 0
        delta = [max(0.0, a - b) for a, b in zip(now, last, strict=True)]
        samples = int(sum(delta))
        if not samples:
            return 0.0, 0
        return quantile(0.95, bounds, delta), samples


class LoadReporter:
    """Sends `ReportLoad` every `interval_s`, and at once after `nudge()`."""

    def __init__(
        self,
        controller_address: str,
        table: RoutingTable,
        held: Callable[[str], int],
        creds: Credentials,
        interval_s: float = 1.0,
        gateway_id: str | None = None,
    ) -> None:
        self.controller_address = controller_address
        self.table = table
        self.held = held
        self.creds = creds
        self.interval_s = interval_s
        self.gateway_id = gateway_id or f"gateway-{socket.gethostname()}-{os.getpid()}"
        self._wake = asyncio.Event()
        self._windows: dict[str, TtftWindow] = {}
        self._failing = False

    def nudge(self) -> None:
        self._wake.set()

    def report(self) -> controller_pb2.ReportLoadRequest:
        """What this process holds now, per model of the table."""
        request = controller_pb2.ReportLoadRequest(gateway_id=self.gateway_id)
        for name, router in self.table.models.items():
            window = self._windows.get(name)
            if window is None:
                window = self._windows[name] = TtftWindow()
            p95, samples = window.take(router.metrics.ttft)
            request.models.add(
                model=name,
                in_flight=router.admission.in_flight,
                queued=router.admission.queued,
                held=self.held(name),
                ttft_p95_s=p95,
                ttft_samples=samples,
            )
        return request

    async def run(self) -> None:
        """Report until cancelled."""
        async with channel(
            self.controller_address, self.creds, "controller", UNARY_CHANNEL_OPTIONS
        ) as report_channel:
            stub = controller_pb2_grpc.ControllerStub(report_channel)
            while True:
                self._wake.clear()
                await self._send(stub)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
                except TimeoutError:
                    pass

    async def _send(self, stub: controller_pb2_grpc.ControllerStub) -> None:
        try:
            await stub.ReportLoad(self.report(), timeout=2.0, metadata=self.creds.metadata())
        except grpc.aio.AioRpcError as exc:
            if not self._failing:
                log.warning(
                    "load report to %s failed (%s); retrying every %.0f s",
                    self.controller_address,
                    describe(exc),
                    self.interval_s,
                )
            self._failing = True
            return
        if self._failing:
            log.info("load reports reach %s again", self.controller_address)
        self._failing = False
