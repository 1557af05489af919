"""Requests held at zero replicas (`gateway/cold_start.py`) and the gateway's load report."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.api_models import GenerationInput
from gateway.cold_start import KEEPALIVE, ColdStarts, Hold, HoldAbandoned
from gateway.errors import ApiError
from gateway.load_reporter import LoadReporter, quantile
from gateway.routing_table import ModelRouter, RoutingTable
from gateway.sse import SeedFormat
from mss.security import Credentials
from protos import controller_pb2
from tests.unit.test_gateway_routing_table import FakeClient


class Client:
    """An ASGI client side: what the gateway sent, and a disconnect on demand."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.leave = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def receive(self) -> dict[str, Any]:
        await self.leave.wait()
        return {"type": "http.disconnect"}


def table(version: int, replicas: int, unavailable: str = "", **extra: Any) -> Any:
    t = controller_pb2.RoutingTable(version=version)
    m = t.models.add(
        model="echo",
        strategy="round_robin",
        autoscaled=True,
        cold_start_timeout_s=extra.pop("timeout", 5.0),
        unavailable=unavailable,
        max_queue=extra.pop("max_queue", 16),
    )
    for i in range(replicas):
        m.routes.add(replica_id=f"r{i}", address=f"h:{i}")
    return t


def setup(**extra: Any) -> tuple[RoutingTable, ColdStarts, ModelRouter, list[int]]:
    rt = RoutingTable(client_factory=FakeClient)
    rt.apply(table(1, 0, **extra))
    nudges: list[int] = []
    holds = ColdStarts(rt, keepalive_s=0.2, on_held=lambda: nudges.append(1), poll_s=0.01)
    router = rt.get("echo")
    assert router is not None
    return rt, holds, router, nudges


async def held(
    holds: ColdStarts, router: ModelRouter, client: Client, form: SeedFormat | None, rid: str
) -> Hold:
    hold = holds.enter(router, client.send, form, rid)
    await hold.wait(client.receive)
    return hold


def fmt() -> SeedFormat:
    return SeedFormat("rid", "echo", GenerationInput(prompt="x", stream=True))


async def test_held_requests_go_in_arrival_order_no_more_than_the_replica_admits() -> None:
    rt, holds, router, nudges = setup()
    assert rt.ready()  # an autoscaled model at zero keeps the gateway ready
    assert holds.needs_hold(router)
    order: list[int] = []
    clients = [Client() for _ in range(5)]

    async def one(i: int) -> None:
        hold = await held(holds, router, clients[i], None, f"r{i}")
        order.append(i)
        await asyncio.sleep(0.05)
        hold.done()

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.005)
    assert holds.held("echo") == 5 and len(nudges) == 5
    rt.apply(table(2, 1))
    router.clients["r0"].stats.max_in_flight = 2  # the replica admits two at once
    await asyncio.sleep(0.03)
    assert order == [0, 1]
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert holds.held("echo") == 0 and not holds.needs_hold(router)
    assert all(not c.sent for c in clients)  # nothing was written while held
    await rt.close()


async def test_cold_start_timeout_is_a_503_with_retry_after() -> None:
    rt, holds, router, _ = setup(timeout=0.1)
    client = Client()
    with pytest.raises(ApiError) as err:
        await held(holds, router, client, None, "r")
    assert err.value.status == 503 and err.value.code == "cold_start_timeout"
    assert (b"retry-after", b"5") in err.value.headers()
    assert "cold start timeout" in err.value.message
    await rt.close()


async def test_queue_bound_refuses_at_once() -> None:
    rt, holds, router, _ = setup(max_queue=1)
    first = asyncio.create_task(held(holds, router, Client(), None, "a"))
    await asyncio.sleep(0.01)
    with pytest.raises(ApiError) as err:
        await held(holds, router, Client(), None, "b")
    assert err.value.status == 503 and err.value.code == "capacity"
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await rt.close()


async def test_a_start_failure_ends_held_requests_with_its_reason() -> None:
    rt, holds, router, _ = setup()
    client = Client()
    task = asyncio.create_task(held(holds, router, client, fmt(), "r"))
    await asyncio.sleep(0.3)  # past the keep-alive: the stream opened
    reason = "replica echo-1 failed to start: exited with code 1; restart 1 in 1.0 s"
    rt.apply(table(2, 0, unavailable=reason))
    with pytest.raises(ApiError) as err:
        await task
    assert err.value.status == 503 and reason in err.value.message
    assert client.sent[0]["status"] == 200
    assert client.sent[1]["body"] == KEEPALIVE
    # A new request is refused at once while the controller says so.
    with pytest.raises(ApiError):
        await held(holds, router, client, None, "r2")
    await rt.close()


async def test_streaming_hold_sends_keepalives_then_the_stream_continues() -> None:
    rt, holds, router, _ = setup()
    client = Client()
    task = asyncio.create_task(held(holds, router, client, fmt(), "r"))
    await asyncio.sleep(0.45)
    rt.apply(table(2, 1))
    hold = await task
    assert hold.opened
    assert [m.get("body") for m in client.sent[1:]] == [KEEPALIVE, KEEPALIVE]
    await hold.send({"type": "http.response.start", "status": 200, "headers": []})  # swallowed
    await hold.send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": False})
    assert len(client.sent) == 4 and client.sent[-1]["body"] == b"data: x\n\n"
    hold.done()
    await rt.close()


async def test_a_client_that_leaves_while_held_gives_back_its_place() -> None:
    rt, holds, router, _ = setup()
    client = Client()
    task = asyncio.create_task(held(holds, router, client, None, "r"))
    await asyncio.sleep(0.02)
    client.leave.set()
    with pytest.raises(HoldAbandoned):
        await task
    assert holds.held("echo") == 0
    await rt.close()


def test_quantile_interpolates_within_the_bucket() -> None:
    bounds = [0.1, 0.5, 1.0, float("inf")]
    assert quantile(0.95, bounds, [0, 0, 0, 0]) == 0.0
    assert quantile(0.5, bounds, [10, 10, 0, 0]) == pytest.approx(0.1)
    assert quantile(0.95, bounds, [0, 20, 0, 0]) == pytest.approx(0.48)
    assert quantile(0.95, bounds, [0, 0, 0, 5]) == 1.0


async def test_load_report_counts_held_in_flight_and_recent_ttft() -> None:
    rt, _, router, _ = setup()
    reporter = LoadReporter("127.0.0.1:1", rt, lambda m: 3, Credentials("gateway"), gateway_id="g")
    first = reporter.report()
    for _ in range(20):
        router.metrics.ttft.observe(0.3)
    router.admission.in_flight = 2
    second = reporter.report().models[0]
    assert first.gateway_id == "g"
    assert (second.model, second.in_flight, second.held, second.ttft_samples) == ("echo", 2, 3, 20)
    assert 0.25 < second.ttft_p95_s <= 0.5
    assert reporter.report().models[0].ttft_samples == 0
    router.admission.in_flight = 0
    await rt.close()
