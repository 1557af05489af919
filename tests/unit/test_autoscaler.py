"""The autoscaling policy (`controller/autoscaler.py`), stepped with a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.autoscaler import REASONS, Decision, Memory, Signals, decide
from mss.config import Autoscaling

CFG = Autoscaling(
    min_replicas=0,
    max_replicas=8,
    target_ongoing_requests=4,
    upscale_delay_s=10,
    downscale_delay_s=60,
    downscale_to_zero_delay_s=120,
)


@dataclass
class Sim:
    """Steps `decide` once a second, as the controller's loop would, keeping its target."""

    cfg: Autoscaling = field(default_factory=lambda: CFG)
    target: int = 0
    now: float = 1000.0
    memory: Memory = field(default_factory=Memory)
    pending: str = ""
    history: list[Decision] = field(default_factory=list)

    def step(self, ongoing: float, held: int = 0, ttft: float | None = None) -> Decision:
        signals = Signals(ongoing, self.target, held, ttft, self.pending)
        d = decide(self.cfg, signals, self.memory, self.now)
        assert d.kind in REASONS
        assert self.cfg.min_replicas <= d.target <= self.cfg.max_replicas
        self.memory = d.memory
        self.target = d.target
        self.history.append(d)
        self.now += 1.0
        return d

    def run(self, seconds: int, ongoing: float, **kw: float) -> list[int]:
        return [self.step(ongoing, **kw).target for _ in range(seconds)]  # type: ignore[arg-type]

    def changes(self) -> list[tuple[str, int]]:
        return [(d.direction, d.target) for d in self.history if d.direction != "hold"]


def test_no_traffic_at_zero_stays_at_zero() -> None:
    sim = Sim()
    assert sim.run(3600, 0) == [0] * 3600
    assert sim.history[-1].reason == "scaled to zero; no request"


def test_a_held_request_starts_a_replica_at_once() -> None:
    sim = Sim()
    d = sim.step(1, held=1)
    assert (d.target, d.direction, d.kind) == (1, "up", "from_zero")
    assert "1 held request" in d.reason


def test_a_burst_at_zero_starts_enough_replicas_within_max() -> None:
    sim = Sim()
    assert sim.step(20, held=20).target == 5  # 20 requests at 4 per replica
    sim = Sim()
    assert sim.step(500, held=500).target == 8  # max_replicas


def test_ramp_up_plateau_ramp_down_to_zero_and_back() -> None:
    sim = Sim()
    sim.step(2, held=2)
    assert sim.target == 1
    # Ramp: 12 ongoing asks for 3; it must last upscale_delay_s (10 s) first.
    assert sim.run(9, 12) == [1] * 9
    assert "up in" in sim.history[-1].reason
    assert sim.run(2, 12)[-1] == 2  # at most doubling in one step
    assert sim.run(10, 12)[-1] == 2
    assert sim.run(1, 12)[-1] == 3
    # Plateau: nothing moves.
    assert sim.run(300, 12) == [3] * 300
    assert sim.history[-1].kind == "steady"
    # Ramp down to 5 ongoing (asks 2): only after downscale_delay_s (60 s).
    assert sim.run(60, 5) == [3] * 60
    assert sim.run(1, 5) == [2]
    # No traffic: down to one after 60 s, then zero after 120 s without a request.
    assert sim.run(61, 0)[-1] == 1
    quiet = sim.run(58, 0)
    assert quiet[-1] == 1 and "zero after 120 s" in sim.history[-1].reason
    assert 0 in sim.run(3, 0)
    assert sim.history[-1].kind in ("to_zero", "idle")
    # And back: the next request starts a replica with no delay.
    assert sim.step(1, held=1).target == 1
    assert sim.changes() == [
        ("up", 1),
        ("up", 2),
        ("up", 3),
        ("down", 2),
        ("down", 1),
        ("down", 0),
        ("up", 1),
    ]


def test_oscillating_load_does_not_flap() -> None:
    sim = Sim(target=2)
    for _ in range(50):  # 16 ongoing (asks 4) and 2 (asks 1) in turn, 5 s each
        sim.run(5, 16)
        sim.run(5, 2)
    assert sim.changes() == []
    assert sim.target == 2


def test_downscale_keeps_the_peak_seen_during_the_delay() -> None:
    sim = Sim(target=6)
    sim.run(30, 4)  # asks 1
    sim.run(1, 12)  # a spike asking 3 (under 6: still a wish to go down)
    sim.run(30, 4)
    assert sim.target == 3


def test_step_up_is_bounded_by_doubling_and_max() -> None:
    sim = Sim(target=1)
    targets = sim.run(60, 400)
    assert sorted(set(targets)) == [1, 2, 4, 8]
    assert targets[-1] == 8


def test_ttft_objective_asks_for_one_more_replica() -> None:
    cfg = CFG.model_copy(update={"ttft_slo_ms": 500.0})
    sim = Sim(cfg=cfg, target=2)
    sim.run(11, 4, ttft=1.2)  # 4 ongoing asks one replica, but TTFT is over the objective
    assert sim.target == 3
    assert sim.history[-1].kind == "ttft" and "over the 500 ms objective" in sim.history[-1].reason
    # No traffic: TTFT alone never scales up.
    sim2 = Sim(cfg=cfg, target=1)
    sim2.run(30, 0, ttft=9.0)
    assert sim2.target == 1


def test_no_room_holds_the_target_and_says_why() -> None:
    sim = Sim(target=2, pending="no node with 4 GiB free")
    sim.run(100, 40)
    assert sim.target == 2
    assert sim.history[-1].reason == "pending: no node with 4 GiB free"
    assert sim.history[-1].kind == "pending"
    sim.pending = ""
    sim.run(11, 40)
    assert sim.target == 4  # once there is room, after the delay


def test_bounds_are_applied_at_once() -> None:
    cfg = Autoscaling(min_replicas=2, max_replicas=3)
    assert decide(cfg, Signals(0, 0), Memory(), 0).target == 2
    d = decide(cfg, Signals(100, 7), Memory(), 0)
    assert (d.target, d.direction, d.kind) == (3, "down", "bounds")


def test_min_one_never_goes_to_zero() -> None:
    cfg = Autoscaling(min_replicas=1, max_replicas=4, downscale_delay_s=5)
    sim = Sim(cfg=cfg, target=3)
    assert sim.run(600, 0)[-1] == 1


def test_starting_replicas_with_no_traffic_are_not_scaled() -> None:
    # The target counts replicas still starting: with no request nothing grows.
    sim = Sim(target=3)
    sim.run(59, 0)
    assert sim.target == 3 and sim.changes() == []
