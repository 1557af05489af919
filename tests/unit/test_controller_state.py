"""The controller's reconcile step, driven by hand with a fake clock: no sleeps, no I/O."""

from __future__ import annotations

import asyncio

from controller.deployment_state import DeploymentState
from controller.route_publisher import RoutePublisher
from controller.store import Store
from mss.config import ControllerSettings, Deployment
from protos import controller_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fake(name: str = "echo", replicas: int = 1, **extra: object) -> Deployment:
    raw: dict[str, object] = {
        "name": name,
        "model": "fake",
        "engine": "fake",
        "replicas": replicas,
        "resources": {"cpus": 1, "memory_gib": 1},
    }
    raw.update(extra)
    return Deployment.model_validate(raw)


def node(node_id: str, cpus: float = 4, gpus: int = 0) -> pb.NodeInfo:
    return pb.NodeInfo(node_id=node_id, host="127.0.0.1", cpus=cpus, memory_gib=16, gpus=gpus)


def make_state(*deployments: Deployment) -> tuple[DeploymentState, Clock]:
    clock = Clock()
    state = DeploymentState(ControllerSettings(), clock=clock, route_grace_s=1.0)
    state.apply(deployments)
    return state, clock


def report(
    state: DeploymentState, node_id: str, status: int = pb.RUNNING, skip: set[str] | None = None
) -> list[pb.ReplicaAssignment] | None:
    """Heartbeat from `node_id` saying every kept replica there is in `status`."""
    reports = []
    for i, a in enumerate(state.assignments(node_id)):
        if skip and a.replica_id in skip:
            continue
        st = status if a.keep else pb.STOPPING
        reports.append(
            pb.ReplicaStatus(
                replica_id=a.replica_id,
                deployment=a.deployment,
                state=st,  # type: ignore[arg-type]
                address=f"127.0.0.1:{50100 + i}",
            )
        )
    return state.heartbeat(node_id, reports)


def routes(state: DeploymentState, model: str = "echo") -> list[str]:
    for m in state.routing_models():
        if m.model == model:
            return [r.replica_id for r in m.routes]
    raise KeyError(model)


def test_places_and_routes_only_running_replicas() -> None:
    state, _ = make_state(fake(replicas=2))
    state.register_node(node("n1"), [])
    state.update()
    assigned = state.assignments("n1")
    assert len(assigned) == 2 and all(a.keep for a in assigned)
    assert Deployment.model_validate_json(assigned[0].deployment_json).engine == "fake"
    assert routes(state) == []
    report(state, "n1", pb.STARTING)
    assert routes(state) == []
    report(state, "n1", pb.RUNNING)
    assert sorted(routes(state)) == sorted(a.replica_id for a in assigned)
    state.update()
    assert len(state.replicas) == 2  # steady state: nothing more placed


def test_spreads_replicas_over_nodes_and_respects_capacity() -> None:
    state, _ = make_state(fake(replicas=3))
    state.register_node(node("n1", cpus=1), [])
    state.register_node(node("n2", cpus=1), [])
    state.update()
    assert len(state.assignments("n1")) == 1
    assert len(state.assignments("n2")) == 1
    assert len(state.replicas) == 2  # the third fits nowhere
    state.register_node(node("n3", cpus=2), [])
    state.update()
    assert len(state.assignments("n3")) == 1


def test_gpu_deployments_go_to_gpu_nodes_only() -> None:
    gpu = fake("big", replicas=3, resources={"cpus": 1, "memory_gib": 1, "gpus": 1})
    cpu = fake("small", replicas=1)
    state, _ = make_state(gpu, cpu)
    state.register_node(node("cpu-node"), [])
    state.register_node(node("gpu-node", gpus=2), [])
    state.update()
    on_gpu = {a.deployment for a in state.assignments("gpu-node")}
    big = [r for r in state.replicas.values() if r.deployment == "big"]
    assert len(big) == 2 and all(r.node_id == "gpu-node" for r in big)
    small = [r for r in state.replicas.values() if r.deployment == "small"]
    assert [r.node_id for r in small] == ["cpu-node"]  # GPU nodes are kept for GPU work
    assert on_gpu == {"big"}


def test_dead_node_replicas_move_and_leave_the_table() -> None:
    state, clock = make_state(fake(replicas=2))
    state.register_node(node("n1", cpus=2), [])
    state.update()
    report(state, "n1")
    state.register_node(node("n2", cpus=2), [])
    old = set(routes(state))
    assert len(old) == 2
    for _ in range(3):  # n2 keeps beating, n1 falls silent
        clock.now += 2.5
        report(state, "n2")
        state.update()
    assert not state.nodes["n1"].alive
    assert routes(state) == []
    moved = state.assignments("n2")
    assert len(moved) == 2 and not {a.replica_id for a in moved} & old
    report(state, "n2")
    assert len(routes(state)) == 2
    assert state.heartbeat("n1", []) is None  # told to register again


def test_scale_down_leaves_routes_first_then_stops_after_grace() -> None:
    state, clock = make_state(fake(replicas=3))
    state.register_node(node("n1"), [])
    state.update()
    report(state, "n1")
    assert len(routes(state)) == 3
    state.scale("echo", 1)
    state.update()
    assert len(routes(state)) == 1
    # Within the grace the scheduler still keeps them, so gateways switch first.
    assert sum(a.keep for a in state.assignments("n1")) == 3
    clock.now += 1.5
    assigned = state.assignments("n1")
    stopping = [a.replica_id for a in assigned if not a.keep]
    assert len(stopping) == 2
    reports = [
        pb.ReplicaStatus(replica_id=a.replica_id, deployment="echo", state=pb.STOPPED)
        if not a.keep
        else pb.ReplicaStatus(
            replica_id=a.replica_id, deployment="echo", state=pb.RUNNING, address="h:1"
        )
        for a in assigned
    ]
    state.heartbeat("n1", reports)
    assert len(state.replicas) == 1
    state.update()
    assert len(state.replicas) == 1


def test_crashed_replica_leaves_table_and_restarts_are_counted() -> None:
    state, _ = make_state(fake(replicas=2))
    state.register_node(node("n1"), [])
    state.update()
    report(state, "n1")
    victim = routes(state)[0]
    reports = [
        pb.ReplicaStatus(
            replica_id=a.replica_id,
            deployment="echo",
            state=pb.UNHEALTHY if a.replica_id == victim else pb.RUNNING,
            address="127.0.0.1:1",
            restarts=1 if a.replica_id == victim else 0,
        )
        for a in state.assignments("n1")
    ]
    state.heartbeat("n1", reports)
    assert victim not in routes(state)
    assert state.take_events().restarts == {"echo": 1}
    state.update()
    assert len(state.replicas) == 2  # the scheduler restarts it; nothing new is placed


def test_restart_restores_state_and_keeps_running_replicas() -> None:
    state, _ = make_state(fake(replicas=2))
    state.register_node(node("n1"), [])
    state.update()
    report(state, "n1")
    before = state.routing_models()
    store = Store(":memory:")
    store.save(state.snapshot(routing_version=7))

    snap = store.load()
    assert snap is not None and snap.routing_version == 7
    again, _ = make_state()
    again.restore(snap)
    again.apply([fake(replicas=2)])  # same file: nothing changes
    again.update()
    assert again.routing_models() == before
    assert report(again, "n1") is not None
    again.update()
    assert set(again.replicas) == set(state.replicas)
    assert all(a.keep for a in again.assignments("n1"))


def test_unchanged_config_keeps_scaled_target_and_changed_spec_rolls() -> None:
    state, _ = make_state(fake(replicas=1))
    state.register_node(node("n1"), [])
    state.scale("echo", 2)
    state.apply([fake(replicas=1)])
    assert state.deployments["echo"].target == 2
    state.update()
    report(state, "n1")
    old = set(routes(state))
    state.apply([fake(replicas=2, engine_args={"token_interval_ms": 5})])
    state.update()
    assert set(routes(state)) == old  # old ones serve until new ones run
    new = [r.replica_id for r in state.replicas.values() if r.replica_id not in old]
    assert len(new) == 2
    report(state, "n1", skip=old)  # the new replicas become ready
    state.update()
    assert set(routes(state)) == set(new)
    assert all(not state.replicas[r].keep for r in old)


def test_routing_only_change_restarts_nothing() -> None:
    state, _ = make_state(fake(replicas=1))
    state.register_node(node("n1"), [])
    state.update()
    report(state, "n1")
    ids = set(state.replicas)
    state.apply([fake(replicas=1, routing="round_robin", limits={"max_in_flight": 8})])
    state.update()
    assert set(state.replicas) == ids
    model = state.routing_models()[0]
    assert model.strategy == "round_robin" and model.max_in_flight == 8
    assert model.response_cache_ttl_s == 0 and not model.coalesce  # off unless asked

    cache = {"enabled": True, "ttl_s": 60, "coalesce": True}
    state.apply([fake(replicas=1, routing="prefix_aware", response_cache=cache)])
    state.update()
    assert set(state.replicas) == ids
    model = state.routing_models()[0]
    assert model.strategy == "prefix_aware"
    assert model.response_cache_ttl_s == 60 and model.coalesce


def test_lost_state_adopts_reported_replicas_and_trims_surplus() -> None:
    state, clock = make_state(fake(replicas=1))
    offered = [
        pb.ReplicaStatus(replica_id=f"echo-{i}", deployment="echo", state=pb.RUNNING, address="a:1")
        for i in range(2)
    ] + [pb.ReplicaStatus(replica_id="gone-1", deployment="gone", state=pb.RUNNING)]
    assigned = state.register_node(node("n1"), offered)
    assert {a.replica_id for a in assigned} == {"echo-0", "echo-1"}  # "gone" is not assigned
    state.update()
    assert len(routes(state)) == 1
    clock.now += 2
    assert sum(a.keep for a in state.assignments("n1")) == 1


def test_removed_deployment_is_stopped_and_unrouted() -> None:
    state, _ = make_state(fake("a"), fake("b"))
    state.register_node(node("n1"), [])
    state.update()
    report(state, "n1")
    state.apply([fake("a")])
    state.update()
    assert [m.model for m in state.routing_models()] == ["a"]
    assert all(not r.keep for r in state.replicas.values() if r.deployment == "b")


async def test_publisher_versions_and_watchers_catch_up() -> None:
    pub = RoutePublisher(version=4)
    model = pb.ModelRoutes(model="echo", routes=[pb.Route(replica_id="r1", address="a:1")])
    assert pub.publish([model]) is True
    assert pub.publish([model]) is False  # same content, same version
    assert pub.version == 5

    behind = pub.watch(known_version=0)
    first = await asyncio.wait_for(anext(behind), 1)
    assert first.version == 5 and first.models[0].routes[0].replica_id == "r1"

    current = pub.watch(known_version=5)
    pending = asyncio.ensure_future(anext(current))
    await asyncio.sleep(0)
    assert not pending.done()  # up to date: nothing sent until a change
    pub.publish([pb.ModelRoutes(model="echo")])
    table = await asyncio.wait_for(pending, 1)
    assert table.version == 6 and not table.models[0].routes
    pub.close()
    await behind.aclose()
    await current.aclose()


def test_restarted_scheduler_gets_its_replicas_back_under_the_same_ids() -> None:
    state, _ = make_state(fake(replicas=2))
    state.register_node(node("n1"), [])
    state.update()
    report(state, "n1")
    ids = set(routes(state))
    # The scheduler restarted (its replicas died with it) and registers with none.
    assigned = state.register_node(node("n1"), [])
    assert {a.replica_id for a in assigned if a.keep} == ids
    assert routes(state) == []  # not routed until they run again
    report(state, "n1")
    assert set(routes(state)) == ids


def test_node_without_heartbeats_within_window_stays_alive() -> None:
    state, clock = make_state(fake(replicas=1))
    state.register_node(node("n1"), [])
    state.update()
    report(state, "n1")
    clock.now += state.dead_after_s - 0.1
    state.update()
    assert state.nodes["n1"].alive and len(routes(state)) == 1
    clock.now += 0.2
    state.update()
    assert not state.nodes["n1"].alive and routes(state) == []


async def test_publisher_jumps_past_a_watcher_that_is_ahead() -> None:
    pub = RoutePublisher()  # state lost: versions would start again at 1
    pub.publish([pb.ModelRoutes(model="echo")])
    watcher = pub.watch(known_version=57)
    table = await asyncio.wait_for(anext(watcher), 1)
    assert table.version == 58 and table.models[0].model == "echo"
    assert pub.version == 58
    pub.close()
    await watcher.aclose()


def test_a_restarted_controller_listens_before_it_acts() -> None:
    """While settling, a registered node gets no new replica and nothing is stopped."""
    clock = Clock()
    state = DeploymentState(ControllerSettings(), clock=clock, settle_s=3.0)
    state.apply([fake(replicas=1)])
    state.register_node(node("n1"), [])
    state.update()
    assert state.settling and not state.replicas
    clock.now += 3.0
    state.update()
    assert not state.settling and len(state.replicas) == 1
