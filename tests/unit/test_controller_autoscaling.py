"""Autoscaling inside the controller's reconcile step: gateways' reports in, targets out."""

from __future__ import annotations

import pytest

from controller.deployment_state import Autoscaled, DeploymentState
from controller.status import deployment_status
from protos import controller_pb2 as pb
from tests.unit.test_controller_state import fake, make_state, node, report, routes

SCALING = {
    "min_replicas": 0,
    "max_replicas": 4,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 5,
    "downscale_delay_s": 10,
    "downscale_to_zero_delay_s": 20,
    "cold_start_timeout_s": 30,
}


def held(state: DeploymentState, gateway: str, n: int, in_flight: int = 0) -> None:
    state.report_load(gateway, [pb.ModelLoad(model="echo", held=n, in_flight=in_flight)])


def model_routes(state: DeploymentState) -> pb.ModelRoutes:
    return next(m for m in state.routing_models() if m.model == "echo")


def test_a_held_request_starts_a_replica_and_the_cold_start_is_timed() -> None:
    state, clock = make_state(fake(replicas=0, autoscaling=SCALING))
    state.register_node(node("n1"), [])
    state.update()
    assert state.deployments["echo"].target == 0 and not state.assignments("n1")
    table = model_routes(state)
    assert table.autoscaled and table.cold_start_timeout_s == 30 and not table.routes
    held(state, "g1", 1)
    state.update()
    assert state.deployments["echo"].target == 1
    assert len(state.assignments("n1")) == 1
    assert state.take_events().decisions == {("echo", "up", "from_zero"): 1}
    report(state, "n1", pb.STARTING)
    clock.now += 3.0
    report(state, "n1", pb.RUNNING)
    state.update()
    assert len(routes(state)) == 1
    assert state.take_events().cold_starts == [("echo", 3.0)]
    status = deployment_status(state, "echo")
    assert status.autoscaling.max_replicas == 4 and status.autoscaling.held_requests == 1
    assert "scale from zero" not in status.autoscaling.last_reason  # now steady
    assert status.autoscaling.last_change_unix > 0


def test_no_traffic_scales_to_zero_and_the_model_stays_routed() -> None:
    state, clock = make_state(fake(replicas=1, autoscaling=SCALING))
    state.register_node(node("n1"), [])
    state.update()
    report(state, "n1", pb.RUNNING)
    for _ in range(19):
        clock.now += 1.0
        report(state, "n1", pb.RUNNING)
        state.update()
        assert state.deployments["echo"].target == 1
    clock.now += 1.5
    report(state, "n1", pb.RUNNING)
    state.update()
    assert state.deployments["echo"].target == 0
    assert [a.keep for a in state.assignments("n1")] == [True]  # route grace first
    assert routes(state) == []  # out of the table at once: drain before stop
    assert model_routes(state).autoscaled and model_routes(state).unavailable == ""
    clock.now += 2.0
    assert [a.keep for a in state.assignments("n1")] == [False]


def test_a_silent_gateway_stops_counting() -> None:
    state, clock = make_state(fake(replicas=1, autoscaling=SCALING))
    state.register_node(node("n1"), [])
    held(state, "g1", 0, in_flight=8)  # asks for 4 replicas
    for _ in range(4):
        state.update()
        report(state, "n1", pb.RUNNING)
        clock.now += 1.0
    assert state.deployments["echo"].scaling.ongoing == 8
    clock.now += 5.0  # past the report's expiry
    state.update()
    assert state.deployments["echo"].scaling.ongoing == 0
    assert state.deployments["echo"].target == 1


def test_no_room_is_pending_with_the_missing_resource() -> None:
    state, _ = make_state(
        fake(replicas=0, autoscaling=SCALING, resources={"cpus": 1, "memory_gib": 4})
    )
    state.register_node(
        pb.NodeInfo(node_id="n1", host="127.0.0.1", cpus=8, memory_gib=2, gpus=0), []
    )
    held(state, "g1", 3)
    state.update()
    state.update()
    record = state.deployments["echo"]
    assert record.pending == "no node with 4 GiB free"
    assert model_routes(state).unavailable == "no room for a replica: no node with 4 GiB free"
    assert deployment_status(state, "echo").autoscaling.last_reason == (
        "pending: no node with 4 GiB free"
    )
    assert ("echo", "hold", "pending") in state.take_events().decisions


def test_a_replica_that_cannot_start_is_named_to_gateways() -> None:
    state, _ = make_state(fake(replicas=0, autoscaling=SCALING))
    state.register_node(node("n1"), [])
    held(state, "g1", 1)
    state.update()
    rid = state.assignments("n1")[0].replica_id
    state.heartbeat(
        "n1",
        [
            pb.ReplicaStatus(
                replica_id=rid,
                deployment="echo",
                state=pb.UNHEALTHY,
                restarts=1,
                message="exited with code 1; restart 1 in 1.0 s",
            )
        ],
    )
    assert model_routes(state).unavailable == (
        f"replica {rid} failed to start: exited with code 1; restart 1 in 1.0 s"
    )


def test_scale_is_refused_and_apply_keeps_the_target_within_new_bounds() -> None:
    state, _ = make_state(fake(replicas=3, autoscaling=SCALING))
    with pytest.raises(Autoscaled, match=r"autoscaling\.min_replicas and max_replicas"):
        state.scale("echo", 2)
    state.apply([fake(replicas=3, autoscaling={**SCALING, "max_replicas": 8})])
    assert state.deployments["echo"].target == 3
    state.apply([fake(replicas=1, autoscaling={**SCALING, "max_replicas": 2})])
    assert state.deployments["echo"].target == 2


def test_replicas_starting_with_no_traffic_are_never_added_to() -> None:
    state, clock = make_state(fake(replicas=2, autoscaling=SCALING))
    state.register_node(node("n1"), [])
    for _ in range(120):  # two minutes of replicas loading, gateways reporting nothing
        state.update()
        report(state, "n1", pb.STARTING)
        state.report_load("g1", [pb.ModelLoad(model="echo")])
        clock.now += 1.0
        assert state.deployments["echo"].target <= 2
    assert len(state.assignments("n1")) <= 2


def test_a_cold_start_wait_is_not_taken_for_a_slow_replica() -> None:
    scaling = {**SCALING, "ttft_slo_ms": 500, "upscale_delay_s": 0}
    state, clock = make_state(fake(replicas=0, autoscaling=scaling))
    state.register_node(node("n1"), [])
    held(state, "g1", 1)
    state.update()
    report(state, "n1", pb.RUNNING)
    state.update()  # the replica runs: the cold start ends
    # The held request's first token came 4 s after it arrived: over the objective.
    state.report_load(
        "g1", [pb.ModelLoad(model="echo", in_flight=1, ttft_p95_s=4.0, ttft_samples=1)]
    )
    clock.now += 1.0
    report(state, "n1", pb.RUNNING)
    state.update()
    assert state.deployments["echo"].target == 1
    clock.now += 10.0  # later, a slow first token is the replica's
    report(state, "n1", pb.RUNNING)
    state.report_load(
        "g1", [pb.ModelLoad(model="echo", in_flight=1, ttft_p95_s=4.0, ttft_samples=1)]
    )
    state.update()
    assert state.deployments["echo"].target == 2
