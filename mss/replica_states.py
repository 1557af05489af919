"""Replica states, named from the generated `ReplicaState` enum (protos/controller.proto).

The proto is the one definition; this module only gives the lower-case names
used in logs, metric labels and `mss status`, so no role keeps its own list.
"""

from __future__ import annotations

from protos import controller_pb2 as pb

STARTING = pb.STARTING
"""Placed on a node, not yet answering Health as ready (or being started again)."""
RUNNING = pb.RUNNING
"""Health answers ready: routed."""
UNHEALTHY = pb.UNHEALTHY
"""Process alive but failing Health, or crashed and waiting for a restart."""
STOPPING = pb.STOPPING
"""Wanted gone: out of the routing table, draining."""
STOPPED = pb.STOPPED
"""Gone."""

LIVE = (STARTING, RUNNING, UNHEALTHY)
"""States of a replica that holds (or is about to hold) its node's resources and serves."""


def state_name(state: int) -> str:
    """`running`, `starting`...; `unknown` for UNSPECIFIED or a number this build lacks."""
    if state == pb.REPLICA_STATE_UNSPECIFIED or state not in pb.ReplicaState.values():
        return "unknown"
    return pb.ReplicaState.Name(state).lower()  # type: ignore[arg-type]


STATE_NAMES: dict[int, str] = {value: state_name(value) for value in pb.ReplicaState.values()}
"""Every state number with its name, for labels that must all be exported."""
