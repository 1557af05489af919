"""The SQLite store: tables derived from the row dataclasses, files of earlier versions load."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from controller.store import (
    DEPLOYMENTS,
    NODES,
    REPLICAS,
    SCHEMA,
    DeploymentRow,
    NodeRow,
    ReplicaRow,
    Snapshot,
    Store,
    to_row,
)

# The schema as it was written by hand before it was derived: files made with it must load.
HAND_WRITTEN_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    applied_json TEXT NOT NULL,
    target INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    cpus REAL NOT NULL,
    memory_gib REAL NOT NULL,
    gpus INTEGER NOT NULL,
    metrics_address TEXT NOT NULL,
    alive INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    replica_id TEXT PRIMARY KEY,
    deployment TEXT NOT NULL,
    node_id TEXT NOT NULL,
    deployment_json TEXT NOT NULL,
    spec_key TEXT NOT NULL,
    state INTEGER NOT NULL,
    keep INTEGER NOT NULL,
    address TEXT NOT NULL,
    metrics_address TEXT NOT NULL,
    pid INTEGER NOT NULL,
    restarts INTEGER NOT NULL,
    cpus REAL NOT NULL,
    memory_gib REAL NOT NULL,
    gpus INTEGER NOT NULL
);
"""

SNAPSHOT = Snapshot(
    deployments=(DeploymentRow("echo", '{"name": "echo"}', '{"name": "echo"}', 3),),
    nodes=(NodeRow("n1", "10.0.0.1", 4.0, 16.0, 1, "10.0.0.1:9102", False),),
    replicas=(
        ReplicaRow(
            replica_id="echo-1",
            deployment="echo",
            node_id="n1",
            deployment_json='{"name": "echo"}',
            spec_key="key",
            state=2,
            keep=True,
            address="10.0.0.1:50100",
            metrics_address="10.0.0.1:9200",
            pid=4242,
            restarts=1,
            cpus=0.5,
            memory_gib=2.0,
            gpus=0,
        ),
    ),
    routing_version=9,
)


def table_info(db: sqlite3.Connection, table: str) -> list[tuple[object, ...]]:
    return list(db.execute(f"PRAGMA table_info({table})"))


def test_derived_schema_matches_the_hand_written_one() -> None:
    derived, written = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
    derived.executescript(SCHEMA)
    written.executescript(HAND_WRITTEN_SCHEMA)
    for table in ("meta", "deployments", "nodes", "replicas"):
        assert table_info(derived, table) == table_info(written, table), table


def test_save_then_load_gives_the_same_snapshot() -> None:
    store = Store(":memory:")
    assert store.load() is None
    store.save(SNAPSHOT)
    assert store.load() == SNAPSHOT
    store.save(Snapshot((), (), (), 10))  # a save replaces everything
    assert store.load() == Snapshot((), (), (), 10)


def test_a_file_written_the_old_way_loads(tmp_path: Path) -> None:
    path = tmp_path / "controller.sqlite"
    db = sqlite3.connect(path)
    db.executescript(HAND_WRITTEN_SCHEMA)
    db.execute(
        'INSERT INTO deployments VALUES (\'echo\', \'{"name": "echo"}\', \'{"name": "echo"}\', 3)'
    )
    db.execute("INSERT INTO nodes VALUES ('n1', '10.0.0.1', 4, 16, 1, '10.0.0.1:9102', 0)")
    db.execute(
        "INSERT INTO replicas VALUES ('echo-1', 'echo', 'n1', '{\"name\": \"echo\"}', 'key', 2, 1,"
        " '10.0.0.1:50100', '10.0.0.1:9200', 4242, 1, 0.5, 2, 0)"
    )
    db.execute("INSERT INTO meta VALUES ('routing_version', '9')")
    db.commit()
    db.close()
    store = Store(str(path))
    loaded = store.load()
    store.close()
    assert loaded == SNAPSHOT
    assert loaded is not None and loaded.nodes[0].alive is False  # 0/1 come back as bools
    assert isinstance(loaded.replicas[0].memory_gib, float)


def test_tables_follow_their_row_fields() -> None:
    assert DEPLOYMENTS.columns == ("name", "spec_json", "applied_json", "target")
    assert NODES.select_sql.endswith("FROM nodes ORDER BY node_id")
    assert REPLICAS.insert_sql.count("?") == 14
    row = SNAPSHOT.replicas[0]
    assert REPLICAS.row(REPLICAS.values(row)) == row
    assert to_row(ReplicaRow, row) == row
