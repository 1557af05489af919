"""The gRPC setting every role runs with (`mss.cli.GRPC_EXPERIMENTS`) takes effect.

gRPC only logs an experiment it does not know ("Unknown experiment") and goes
on, so a gRPC release that dropped these two would leave the setting without
effect and the serving path with its extra wakes: this measures it.
Context switches are counted, not timed, so the comparison holds on a busy
machine (18 against 10 per round trip with two cores kept busy beside it).
"""

from __future__ import annotations

from loadtest import grpc_hops
from mss.cli import GRPC_EXPERIMENTS


def test_a_message_wakes_fewer_threads_with_the_setting_than_with_grpc_defaults() -> None:
    default = grpc_hops.measure("", 1000)
    ours = grpc_hops.measure(GRPC_EXPERIMENTS, 1000)
    assert ours["switches"] < 0.8 * default["switches"], (ours, default)
