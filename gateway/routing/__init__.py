"""Replica choice: a family of routing strategies, pure and synchronous.

- `strategy`: the `Strategy` interface and `ReplicaStats`, what every strategy sees.
- one module per strategy: `round_robin`, `random_choice` (`random`),
  `least_connections`, `least_latency`, `least_loaded`, `power_of_two`,
  `session_affinity`, `prefix_aware` (its index is `gateway.prefix_index`).
- `registry`: the names, `make_strategy`, `STRATEGIES`, `DEFAULT_STRATEGY`.

Nothing here imports the gateway app or `mss.config` (which imports the
registry to validate `Deployment.routing`) at import time, so there is no
import cycle.
"""

from gateway.routing.least_connections import LeastConnections
from gateway.routing.least_latency import LeastLatency
from gateway.routing.least_loaded import LeastLoaded
from gateway.routing.power_of_two import PowerOfTwo
from gateway.routing.prefix_aware import PrefixAware
from gateway.routing.random_choice import Random
from gateway.routing.registry import DEFAULT_STRATEGY, STRATEGIES, make_strategy
from gateway.routing.round_robin import RoundRobin
from gateway.routing.session_affinity import SessionAffinity
from gateway.routing.strategy import NO_EXCLUDE, Exclude, ReplicaStats, Strategy

__all__ = [
    "DEFAULT_STRATEGY",
    "NO_EXCLUDE",
    "STRATEGIES",
    "Exclude",
    "LeastConnections",
    "LeastLatency",
    "LeastLoaded",
    "PowerOfTwo",
    "PrefixAware",
    "Random",
    "ReplicaStats",
    "RoundRobin",
    "SessionAffinity",
    "Strategy",
    "make_strategy",
]
