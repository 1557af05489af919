"""The load each gateway process reports (`ReportLoad`), kept until it goes stale.

A gateway reports about once a second what it holds per model: requests in
flight, queued, and held while no replica is ready, and its recent TTFT p95.
Each report replaces that gateway's previous one; a gateway silent for
`expires_after_s` no longer counts, so one that disappears cannot keep a
deployment scaled up.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos import controller_pb2 as pb


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One model's load summed over the gateways that reported recently."""

    ongoing: int = 0
    """In flight plus queued plus held."""
    held: int = 0
    ttft_p95_s: float | None = None
    """The worst recent p95 among the gateways that measured one."""


class LoadReports:
    """The last report of each gateway, by gateway id."""

    def __init__(self, expires_after_s: float) -> None:
        self.expires_after_s = expires_after_s
        self._reports: dict[str, tuple[float, dict[str, pb.ModelLoad]]] = {}

    def record(self, gateway_id: str, models: list[pb.ModelLoad], now: float) -> None:
        self._reports[gateway_id] = (now, {m.model: m for m in models})

    def gateways(self, now: float) -> int:
        """Gateways whose report is fresh."""
        self._expire(now)
        return len(self._reports)

    def for_model(self, model: str, now: float) -> ModelLoad:
        self._expire(now)
        ongoing = held = 0
        ttft: float | None = None
        for _, models in self._reports.values():
            load = models.get(model)
            if load is None:
                continue
            ongoing += load.in_flight + load.queued + load.held
            held += load.held
            if load.ttft_samples:
                ttft = max(ttft or 0.0, load.ttft_p95_s)
        return ModelLoad(ongoing, held, ttft)

    def _expire(self, now: float) -> None:
        stale = [g for g, (seen, _) in self._reports.items() if now - seen > self.expires_after_s]
        for gateway_id in stale:
            del self._reports[gateway_id]
