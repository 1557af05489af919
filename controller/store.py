"""SQLite persistence of the controller's state: deployments, nodes, replicas, table version.

The controller is the only writer. A save replaces the whole state in one
transaction; the state is small (tens of rows), so a full rewrite costs well
under a millisecond and keeps the file always consistent. Callers run `save`
and `load` in a worker thread (`asyncio.to_thread`) so the event loop that
answers heartbeats never waits on the disk.

Each table is defined once, by its row dataclass: the column names, their SQL
types, the CREATE TABLE, INSERT and SELECT all come from the dataclass's
fields, in field order, the first field being the primary key. Field names are
the column names of files written by earlier versions, so those files load.

Load figures and heartbeat times are not stored: they are stale the moment
the controller stops, and the schedulers report fresh ones within seconds.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

RowT = TypeVar("RowT", bound="DataclassInstance")


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


def to_row(row_type: type[RowT], record: object) -> RowT:
    """A `row_type` with each field read from the attribute of the same name on `record`."""
    return row_type(**{f.name: getattr(record, f.name) for f in fields(row_type)})


_SQL_TYPES: dict[type, str] = {str: "TEXT", int: "INTEGER", float: "REAL", bool: "INTEGER"}
"""Python field type -> SQLite column type. Booleans are stored as 0 and 1."""


class Table(Generic[RowT]):
    """The SQL of one table, derived from its row dataclass."""

    def __init__(self, name: str, row_type: type[RowT]) -> None:
        self.name = name
        self.row_type = row_type
        hints = typing.get_type_hints(row_type)
        self.columns = tuple(f.name for f in fields(row_type))
        self._convert: tuple[Callable[[Any], Any], ...] = tuple(hints[c] for c in self.columns)
        key, *rest = self.columns
        decls = [f"{key} {_SQL_TYPES[hints[key]]} PRIMARY KEY"]
        decls += [f"{c} {_SQL_TYPES[hints[c]]} NOT NULL" for c in rest]
        body = ",\n    ".join(decls)
        names = ", ".join(self.columns)
        self.create_sql = f"CREATE TABLE IF NOT EXISTS {name} (\n    {body}\n);"
        self.insert_sql = (
            f"INSERT INTO {name} ({names}) VALUES ({', '.join('?' * len(self.columns))})"
        )
        self.select_sql = f"SELECT {names} FROM {name} ORDER BY {key}"

    def values(self, row: RowT) -> tuple[object, ...]:
        return tuple(getattr(row, c) for c in self.columns)

    def row(self, values: Iterable[object]) -> RowT:
        """A row from a SELECT result; SQLite's 0/1 become bools again."""
        return self.row_type(
            *(convert(v) for convert, v in zip(self._convert, values, strict=True))
        )


DEPLOYMENTS = Table("deployments", DeploymentRow)
NODES = Table("nodes", NodeRow)
REPLICAS = Table("replicas", ReplicaRow)

SCHEMA = "\n".join(
    [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        DEPLOYMENTS.create_sql,
        NODES.create_sql,
        REPLICAS.create_sql,
    ]
)


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
            return Snapshot(
                deployments=tuple(DEPLOYMENTS.row(r) for r in db.execute(DEPLOYMENTS.select_sql)),
                nodes=tuple(NODES.row(r) for r in db.execute(NODES.select_sql)),
                replicas=tuple(REPLICAS.row(r) for r in db.execute(REPLICAS.select_sql)),
                routing_version=int(row[0]),
            )

    def save(self, snap: Snapshot) -> None:
        """Replace the stored state with `snap`, atomically."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                _replace(db, DEPLOYMENTS, snap.deployments)
                _replace(db, NODES, snap.nodes)
                _replace(db, REPLICAS, snap.replicas)
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('routing_version', ?)",
                    (str(snap.routing_version),),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise


def _replace(db: sqlite3.Connection, table: Table[RowT], rows: Iterable[RowT]) -> None:
    db.execute(f"DELETE FROM {table.name}")
    db.executemany(table.insert_sql, [table.values(r) for r in rows])
