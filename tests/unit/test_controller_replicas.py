"""The replica container: its node and deployment indexes agree with a full scan."""

from __future__ import annotations

import random

import pytest

from controller.replicas import ReplicaContainer, ReplicaRecord


def rec(replica_id: str, deployment: str = "echo", node_id: str = "n1") -> ReplicaRecord:
    return ReplicaRecord(
        replica_id=replica_id,
        deployment=deployment,
        node_id=node_id,
        deployment_json="{}",
        spec_key="k",
        cpus=1.0,
        memory_gib=1.0,
        gpus=0,
        created=0.0,
    )


def ids(records: list[ReplicaRecord]) -> list[str]:
    return [r.replica_id for r in records]


def assert_indexes_match_scan(container: ReplicaContainer) -> None:
    records = list(container.values())
    for node_id in {r.node_id for r in records} | {"nowhere"}:
        assert ids(container.on_node(node_id)) == ids([r for r in records if r.node_id == node_id])
    names = {r.deployment for r in records}
    assert container.deployment_names() == names
    for name in names | {"none"}:
        assert ids(container.of_deployment(name)) == ids(
            [r for r in records if r.deployment == name]
        )


def test_indexes_by_node_and_deployment() -> None:
    replicas = ReplicaContainer(
        [rec("a-1", "a", "n1"), rec("b-1", "b", "n1"), rec("a-2", "a", "n2")]
    )
    assert len(replicas) == 3 and list(replicas) == ["a-1", "b-1", "a-2"]
    assert ids(replicas.on_node("n1")) == ["a-1", "b-1"]
    assert ids(replicas.of_deployment("a")) == ["a-1", "a-2"]
    assert replicas.deployment_names() == {"a", "b"}
    assert replicas.get("missing") is None and "b-1" in replicas


def test_remove_updates_every_index_and_drops_empty_buckets() -> None:
    replicas = ReplicaContainer([rec("a-1", "a", "n1"), rec("b-1", "b", "n2")])
    removed = replicas.remove("b-1")
    assert removed.replica_id == "b-1" and "b-1" not in replicas
    assert replicas.on_node("n2") == [] and replicas.of_deployment("b") == []
    assert replicas.deployment_names() == {"a"}
    with pytest.raises(KeyError):
        replicas.remove("b-1")


def test_duplicate_id_is_refused_and_leaves_the_container_unchanged() -> None:
    replicas = ReplicaContainer([rec("a-1", "a", "n1")])
    with pytest.raises(ValueError, match="a-1"):
        replicas.add(rec("a-1", "b", "n2"))
    assert replicas.on_node("n2") == [] and replicas.deployment_names() == {"a"}
    assert_indexes_match_scan(replicas)


def test_removing_while_looping_over_a_node_is_safe() -> None:
    replicas = ReplicaContainer([rec(f"a-{i}") for i in range(4)])
    for r in replicas.on_node("n1"):
        replicas.remove(r.replica_id)
    assert len(replicas) == 0 and replicas.deployment_names() == set()


def test_clear_empties_every_index() -> None:
    replicas = ReplicaContainer([rec("a-1"), rec("b-1", "b", "n2")])
    replicas.clear()
    assert len(replicas) == 0 and replicas.on_node("n1") == []
    assert replicas.deployment_names() == set()
    replicas.add(rec("a-1"))
    assert_indexes_match_scan(replicas)


def test_random_adds_and_removes_keep_indexes_consistent() -> None:
    rng = random.Random(7)
    replicas = ReplicaContainer()
    for step in range(400):
        if replicas and rng.random() < 0.4:
            replicas.remove(rng.choice(list(replicas)))
        else:
            replicas.add(rec(f"r-{step}", rng.choice("abc"), rng.choice(["n1", "n2", "n3"])))
        assert_indexes_match_scan(replicas)
