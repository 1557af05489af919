"""SQLite persistence of the controller's state: deployments, nodes, replicas, table version.

The controller is the only writer. A save replaces the whole state in one
transaction; the state is small (tens of rows), so a full rewrite costs well
under a millisecond and keeps the file always consistent. Callers run `save`
and `load` in a worker thread (`asyncio.to_thread`) so the event loop that
answers heartbeats never waits on the disk.

Load figures and heartbeat times are not stored: they are stale the moment
the controller stops, and the schedulers report fresh ones within seconds.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
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


@dataclass(frozen=True, slots=True)
class DeploymentRow:
    name: str
    spec_json: str
    """The deployment as it runs now (its `replicas` field is not the target)."""
    applied_json: str
    """The deployment as the config file last gave it; unchanged file keeps a scaled target."""
    target: int


@dataclass(frozen=True, slots=True)
class NodeRow:
    node_id: str
    host: str
    cpus: float
    memory_gib: float
    gpus: int
    metrics_address: str
    alive: bool


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    replica_id: str
    deployment: str
    node_id: str
    deployment_json: str
    spec_key: str
    state: int
    keep: bool
    address: str
    metrics_address: str
    pid: int
    restarts: int
    cpus: float
    memory_gib: float
    gpus: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the controller needs to resume after a restart."""

    deployments: tuple[DeploymentRow, ...]
    nodes: tuple[NodeRow, ...]
    replicas: tuple[ReplicaRow, ...]
    routing_version: int


class Store:
    """One SQLite file; `path` ':memory:' keeps the state in memory (tests)."""

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            path = os.path.expanduser(path)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def load(self) -> Snapshot | None:
        """The saved state, or None when the file holds none yet."""
        with self._lock:
            db = self._db
            row = db.execute("SELECT value FROM meta WHERE key = 'routing_version'").fetchone()
            if row is None:
                return None
            deployments = tuple(
                DeploymentRow(name, spec, applied, int(target))
                for name, spec, applied, target in db.execute(
                    "SELECT name, spec_json, applied_json, target FROM deployments ORDER BY name"
                )
            )
            nodes = tuple(
                NodeRow(nid, host, float(cpus), float(mem), int(gpus), metrics, bool(alive))
                for nid, host, cpus, mem, gpus, metrics, alive in db.execute(
                    "SELECT node_id, host, cpus, memory_gib, gpus, metrics_address, alive "
                    "FROM nodes ORDER BY node_id"
                )
            )
            replicas = tuple(
                ReplicaRow(
                    replica_id=r[0],
                    deployment=r[1],
                    node_id=r[2],
                    deployment_json=r[3],
                    spec_key=r[4],
                    state=int(r[5]),
                    keep=bool(r[6]),
                    address=r[7],
                    metrics_address=r[8],
                    pid=int(r[9]),
                    restarts=int(r[10]),
                    cpus=float(r[11]),
                    memory_gib=float(r[12]),
                    gpus=int(r[13]),
                )
                for r in db.execute(
                    "SELECT replica_id, deployment, node_id, deployment_json, spec_key, state, "
                    "keep, address, metrics_address, pid, restarts, cpus, memory_gib, gpus "
                    "FROM replicas ORDER BY replica_id"
                )
            )
            return Snapshot(deployments, nodes, replicas, int(row[0]))

    def save(self, snap: Snapshot) -> None:
        """Replace the stored state with `snap`, atomically."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM deployments")
                db.execute("DELETE FROM nodes")
                db.execute("DELETE FROM replicas")
                db.executemany(
                    "INSERT INTO deployments VALUES (?, ?, ?, ?)",
                    [(d.name, d.spec_json, d.applied_json, d.target) for d in snap.deployments],
                )
                db.executemany(
                    "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            n.node_id,
                            n.host,
                            n.cpus,
                            n.memory_gib,
                            n.gpus,
                            n.metrics_address,
                            n.alive,
                        )
                        for n in snap.nodes
                    ],
                )
                db.executemany(
                    "INSERT INTO replicas VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            r.replica_id,
                            r.deployment,
                            r.node_id,
                            r.deployment_json,
                            r.spec_key,
                            r.state,
                            r.keep,
                            r.address,
                            r.metrics_address,
                            r.pid,
                            r.restarts,
                            r.cpus,
                            r.memory_gib,
                            r.gpus,
                        )
                        for r in snap.replicas
                    ],
                )
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('routing_version', ?)",
                    (str(snap.routing_version),),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
