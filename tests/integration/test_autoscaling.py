"""Autoscaling with real processes: controller, one scheduler, gateway, fake-engine replicas.

The fake engine's `load_delay_s` makes every cold start take seconds, as a
real model's load does; delays are short so each test stays well under a
minute or two. Every request's outcome is checked: none may fail while the
replica count follows the load up, down, to zero and back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from protos import controller_pb2 as pb
from tests.integration.test_control_plane import Cluster, Load, run_mss, running
from tests.support import Proc, spawn

FAST_SCALING = {
    "min_replicas": 0,
    "max_replicas": 3,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    "downscale_to_zero_delay_s": 4,
    "cold_start_timeout_s": 30,
}


class AutoscaledCluster(Cluster):
    """The control-plane test cluster, its gateway reading the config file too."""

    gateway_settings: dict[str, Any]

    def write_config(self, **overrides: object) -> Path:
        path = super().write_config(**overrides)
        config = yaml.safe_load(path.read_text())
        config["gateway"].update(getattr(self, "gateway_settings", {}))
        path.write_text(yaml.safe_dump(config))
        return path

    def start_gateway(self) -> Proc:
        proc = spawn(
            [
                "gateway",
                "--controller",
                self.controller,
                "--config",
                str(self.tmp / "cluster.yaml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.gateway_port),
            ],
            "gateway",
        )
        self.procs["gateway"] = proc
        return proc


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[AutoscaledCluster]:
    c = AutoscaledCluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


async def start(c: AutoscaledCluster, **deployment: object) -> pb.StatusResponse:
    c.replicas = 0
    c.write_config(**deployment)
    c.start_controller()
    c.start_scheduler("n1", 0)
    c.start_gateway()
    status = await c.wait_for("the node", lambda s: any(n.alive for n in s.nodes))
    await c.wait_gateway_ready()  # an autoscaled model at zero: ready, requests are held
    return status


def deployment(s: pb.StatusResponse, name: str = "echo") -> pb.DeploymentStatus:
    return next(d for d in s.deployments if d.name == name)


async def one_request(url: str, stream: bool = True, timeout: float = 60.0) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "stream": stream}
    async with httpx.AsyncClient(timeout=timeout) as http:
        return await http.post(f"{url}/v1/chat/echo", json=body)


async def test_load_ramp_scales_up_down_to_zero_and_back_failing_nothing(
    cluster: AutoscaledCluster,
) -> None:
    await start(
        cluster,
        autoscaling=FAST_SCALING,
        engine_args={"token_interval_ms": 20, "load_delay_s": 3},
    )
    status = await cluster.status()
    assert deployment(status).target_replicas == 0
    table = (await asyncio.to_thread(run_mss, "status", "--controller", cluster.controller)).stdout
    assert "scaled to zero" in table
    async with httpx.AsyncClient(timeout=5.0) as http:
        card = (await http.get(f"{cluster.url}/v1/models")).json()["data"][0]
    assert (card["id"], card["scaled_to_zero"], card["ready_replicas"]) == ("echo", True, 0)

    # At zero: the request is held, a replica starts at once, the request is served.
    began = time.monotonic()
    resp = await one_request(cluster.url)
    cold = time.monotonic() - began
    assert resp.status_code == 200, resp.text
    assert '"finished":true' in resp.text and cold >= 3.0
    async with httpx.AsyncClient(timeout=5.0) as http:
        models = (await http.get(f"{cluster.url}/v1/models")).json()["data"]
    assert [m["id"] for m in models] == ["echo"]

    # Ramp up: 2, then 6 closed-loop streams (target 2 per replica: 3 replicas).
    small = Load(cluster.url, clients=2)
    small.start()
    await small.wait_answered(5)
    big = Load(cluster.url, clients=4)
    big.start()
    peak = await cluster.wait_for("3 running replicas", lambda s: len(running(s)) == 3, 60)
    assert deployment(peak).autoscaling.last_direction in ("up", "hold")
    await big.wait_answered(10, after=time.monotonic())
    # Ramp down: back to 2 streams, then none.
    await big.stop()
    await cluster.wait_for("scale down", lambda s: deployment(s).target_replicas < 3, 30)
    await small.wait_answered(5, after=time.monotonic())
    await small.stop()
    zero = await cluster.wait_for(
        "scale to zero", lambda s: deployment(s).target_replicas == 0 and not s.replicas, 40
    )
    assert deployment(zero).running_replicas == 0

    # And back: served again after a cold start.
    resp = await one_request(cluster.url, stream=False)
    assert resp.status_code == 200, resp.text
    assert resp.json()["finished"] is True

    outcomes = small.outcomes + big.outcomes
    failed = small.failures() + big.failures()
    assert not failed, failed[:3]
    assert len(outcomes) > 30
    async with httpx.AsyncClient(timeout=5.0) as http:
        metrics = (await http.get(f"{cluster.url}/metrics")).text
    assert 'mss_gateway_hold_seconds_count{model="echo"} 2.0' in metrics
    log = cluster.procs["controller"].log()
    assert "autoscaling echo: 0 -> 1 replicas: scale from zero" in log
    assert "-> 0 replicas: no request for" in log


async def test_cold_start_timeout_is_503_with_retry_after(cluster: AutoscaledCluster) -> None:
    cluster.gateway_settings = {"hold_keepalive_s": 0.5}
    await start(
        cluster,
        autoscaling={**FAST_SCALING, "cold_start_timeout_s": 2},
        engine_args={"token_interval_ms": 20, "load_delay_s": 20},
    )
    plain, streamed = await asyncio.gather(
        one_request(cluster.url, stream=False), one_request(cluster.url, stream=True)
    )
    assert plain.status_code == 503, plain.text
    assert plain.headers["retry-after"] == "5"
    assert "cold start timeout" in plain.json()["error"]["message"]
    # The stream opened with keep-alive comments while held, then ended with the 503.
    assert streamed.status_code == 200
    assert streamed.text.startswith(": waiting for a replica\n\n")
    assert streamed.text.count(": waiting for a replica") >= 2
    assert "cold start timeout" in streamed.text and '"code":503' in streamed.text


async def test_a_replica_that_cannot_start_fails_held_requests_clearly(
    cluster: AutoscaledCluster,
) -> None:
    await start(
        cluster,
        autoscaling=FAST_SCALING,
        engine_args={"load_delay_s": 0.5, "load_error": "simulated corrupt weights"},
    )
    resp = await one_request(cluster.url, stream=False, timeout=30)
    assert resp.status_code == 503, resp.text
    message = resp.json()["error"]["message"]
    assert "failed to start: exited with code 1" in message, message
    assert "engine failed to start: RuntimeError('simulated corrupt weights')" in message
    assert "retry-after" in resp.headers
    # The controller does not give up: the scheduler restarts it with backoff.
    await cluster.wait_for(
        "restarts", lambda s: any(r.status.restarts >= 2 for r in s.replicas), 30
    )
    out = await asyncio.to_thread(run_mss, "scale", "echo", "2", "--controller", cluster.controller)
    assert out.returncode == 1 and "is autoscaled" in out.stderr, out.stderr


async def test_a_burst_at_zero_is_served_in_order_within_the_replica_limit(
    cluster: AutoscaledCluster,
) -> None:
    await start(
        cluster,
        autoscaling={**FAST_SCALING, "max_replicas": 1},
        engine_args={"token_interval_ms": 20, "load_delay_s": 2},
        limits={"replica_max_in_flight": 4},
    )
    finished: list[int] = []

    async def one(i: int) -> int:
        await asyncio.sleep(0.05 * i)  # arrival order
        resp = await one_request(cluster.url, stream=i % 2 == 0)
        finished.append(i)
        return resp.status_code

    codes = await asyncio.gather(*(one(i) for i in range(16)))
    assert codes == [200] * 16
    # Four at a time, oldest first: the first arrivals are among the first to finish.
    assert {0, 1, 2, 3} <= set(finished[:8]) and {12, 13, 14, 15} <= set(finished[-8:])
    async with httpx.AsyncClient(timeout=5.0) as http:
        metrics = (await http.get(f"{cluster.url}/metrics")).text
    assert 'mss_gateway_retries_total{model="echo"} 0.0' in metrics  # the replica refused none
