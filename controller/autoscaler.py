"""The autoscaling decision: how many replicas a deployment should run, and why.

`decide` is a pure function of the deployment's `Autoscaling` settings, what
was measured (`Signals`), what it remembered from its last call (`Memory`) and
the time; `DeploymentState` calls it on every reconcile step and sets the
target it returns. Unit tests step it with a fake clock.

The rules, in order:

- The bounds come first: a target outside `min_replicas..max_replicas` (the
  bounds were changed) goes back inside at once.
- At zero, a request (held by a gateway, or in flight anywhere) starts
  replicas at once, enough for the load seen; with no request nothing
  happens. Load is only ever requests that exist, never the lack of ready
  replicas, so neither a deployment at zero nor one whose replicas are still
  starting is scaled with no traffic (the feedback loop Ray Serve had to fix).
- Up: the load (and the TTFT objective, when set) must ask for more replicas
  for `upscale_delay_s` without a break; then the target grows towards what
  it asks, at most doubling in one step.
- Down: the load must ask for fewer for `downscale_delay_s` without a break;
  then the target falls to the most replicas asked for during that time, not
  below one. The last replica goes (with `min_replicas: 0`) only after
  `downscale_to_zero_delay_s` without any request.
- No room: while a wanted replica cannot be placed, the target does not grow
  and the reason says what is missing ("pending: no node with 4 GiB free").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from mss.config import Autoscaling

Direction = Literal["up", "down", "hold"]

REASONS = (
    "from_zero",
    "to_zero",
    "load",
    "ttft",
    "bounds",
    "pending",
    "steady",
    "waiting",
    "idle",
)
"""Reason kinds, for the decisions metric (`reason` label); the text says more."""


@dataclass(frozen=True, slots=True)
class Signals:
    """What the controller measured for one deployment at one step."""

    ongoing: float
    """Requests in flight, queued or held for the deployment (gateways' reports, or the
    replicas' running plus waiting when that is larger)."""
    current: int
    """The deployment's target now (replicas wanted, started or not)."""
    held: int = 0
    """Requests gateways hold because no replica is ready."""
    ttft_p95_s: float | None = None
    """Recent time-to-first-token p95 seen by the gateways; None when nothing was measured."""
    pending: str = ""
    """Why a wanted replica could not be placed ("no node with 4 GiB free"); empty when all were."""


@dataclass(frozen=True, slots=True)
class Memory:
    """What `decide` carries from one call to the next."""

    up_since: float | None = None
    """Since when the load has asked for more replicas without a break."""
    down_since: float | None = None
    """Since when the load has asked for fewer replicas without a break."""
    down_peak: int = 0
    """The most replicas the load asked for since `down_since`."""
    idle_since: float | None = None
    """Since when no request was seen."""


@dataclass(frozen=True, slots=True)
class Decision:
    target: int
    direction: Direction
    kind: str
    """One of `REASONS`."""
    reason: str
    """For operators: what was measured and what the decision waits for."""
    memory: Memory


def wanted(cfg: Autoscaling, signals: Signals) -> tuple[int, str, str]:
    """Replicas the load asks for now, within the bounds; with the reason kind and text."""
    load = math.ceil(signals.ongoing / cfg.target_ongoing_requests - 1e-9)
    want = cfg.clamp(max(load, 1 if signals.ongoing > 0 else 0))
    kind = "load"
    text = (
        f"{signals.ongoing:g} ongoing requests at {cfg.target_ongoing_requests:g} "
        f"per replica ask for {load}"
    )
    slo = cfg.ttft_slo_ms
    ttft = signals.ttft_p95_s
    if slo is not None and ttft is not None and signals.ongoing > 0 and ttft * 1000 > slo:
        if want <= signals.current and signals.current < cfg.max_replicas:
            want = signals.current + 1
            kind = "ttft"
            text = f"TTFT p95 {ttft * 1000:.0f} ms is over the {slo:g} ms objective"
    return want, kind, text


def decide(cfg: Autoscaling, signals: Signals, memory: Memory, now: float) -> Decision:
    """The target for the next step, given the load and what the last call remembered."""
    current = signals.current
    idle_since = None if signals.ongoing > 0 or signals.held > 0 else memory.idle_since or now
    mem = replace(memory, idle_since=idle_since)
    calm = replace(mem, up_since=None, down_since=None, down_peak=0)

    if current != cfg.clamp(current):
        target = cfg.clamp(current)
        direction: Direction = "up" if target > current else "down"
        bounds = f"{cfg.min_replicas}..{cfg.max_replicas}"
        return Decision(target, direction, "bounds", f"{current} is outside {bounds}", calm)

    want, kind, text = wanted(cfg, signals)

    if current == 0:
        if want == 0:
            return Decision(0, "hold", "idle", "scaled to zero; no request", calm)
        held = f"{signals.held} held request{'s' if signals.held != 1 else ''}"
        return Decision(want, "up", "from_zero", f"scale from zero: {held}; {text}", calm)

    if want > current:
        if signals.pending:
            why = f"pending: {signals.pending}"
            return Decision(current, "hold", "pending", why, replace(calm, up_since=mem.up_since))
        up_since = memory.up_since if memory.up_since is not None else now
        waited = now - up_since
        if waited < cfg.upscale_delay_s:
            left = cfg.upscale_delay_s - waited
            why = f"{text}; up in {left:.0f} s unless the load falls (upscale_delay_s)"
            return Decision(current, "hold", "waiting", why, replace(calm, up_since=up_since))
        target = min(want, current * 2, cfg.max_replicas)
        return Decision(target, "up", kind, f"{text}; {current} -> {target}", calm)

    if want < current:
        down_since = memory.down_since if memory.down_since is not None else now
        peak = max(memory.down_peak, want) if memory.down_since is not None else want
        waiting = replace(calm, down_since=down_since, down_peak=peak)
        if current == 1:  # want is 0: only min_replicas 0 and no request get here
            quiet = now - (idle_since if idle_since is not None else now)
            delay = cfg.to_zero_delay_s
            if quiet < delay:
                why = f"no request for {quiet:.0f} s; zero after {delay:g} s"
                return Decision(1, "hold", "waiting", why, waiting)
            why = f"no request for {quiet:.0f} s (downscale_to_zero_delay_s {delay:g})"
            return Decision(0, "down", "to_zero", why, calm)
        waited = now - down_since
        if waited < cfg.downscale_delay_s:
            left = cfg.downscale_delay_s - waited
            why = f"{text}; down in {left:.0f} s unless the load rises (downscale_delay_s)"
            return Decision(current, "hold", "waiting", why, waiting)
        target = max(peak, 1, cfg.min_replicas)
        why = f"{text} for {waited:.0f} s; {current} -> {target}"
        return Decision(target, "down", "load", why, calm)

    if signals.pending:
        return Decision(current, "hold", "pending", f"pending: {signals.pending}", calm)
    return Decision(current, "hold", "steady", f"{text}; at target", calm)
