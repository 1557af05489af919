"""The routing strategies by name: the one list configs, flags and routing tables use.

A new strategy is one module with a `Strategy` subclass and one line in
`_CLASSES` below; `mss.config` validates `Deployment.routing` against
`STRATEGIES` and the gateway's `--routing` flag offers the same names.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from gateway.routing.least_connections import LeastConnections
from gateway.routing.least_latency import LeastLatency
from gateway.routing.least_loaded import LeastLoaded
from gateway.routing.power_of_two import PowerOfTwo
from gateway.routing.prefix_aware import PrefixAware
from gateway.routing.random_choice import Random
from gateway.routing.round_robin import RoundRobin
from gateway.routing.session_affinity import SessionAffinity
from gateway.routing.strategy import Strategy

if TYPE_CHECKING:
    from mss.config import PrefixRouting

_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        Random,
        LeastConnections,
        LeastLatency,
        LeastLoaded,
        PowerOfTwo,
        SessionAffinity,
        PrefixAware,
    )
}
STRATEGIES: tuple[str, ...] = tuple(_CLASSES)
"""Every strategy name, in a stable order (help texts and error messages list them so)."""
DEFAULT_STRATEGY = PrefixAware.name
"""What a deployment that names no strategy gets: measured in docs/benchmarks.md
("Prefix-aware routing"), never behind least_loaded and ahead of it where prompts share
prefixes."""


def make_strategy(
    name: str, rng: random.Random | None = None, prefix_routing: PrefixRouting | None = None
) -> Strategy:
    """The strategy called `name`; an empty name gives the default (prefix_aware).

    `prefix_routing` is the gateway's settings for `prefix_aware` (its defaults when None);
    the other strategies take no settings.
    """
    cls = _CLASSES.get(name or DEFAULT_STRATEGY)
    if cls is None:
        raise ValueError(
            f"unknown routing strategy {name!r}; expected one of {', '.join(STRATEGIES)}"
        )
    if cls is PrefixAware:
        return PrefixAware(rng, prefix_routing)
    return cls(rng)
