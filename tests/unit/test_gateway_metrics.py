"""Multiprocess metrics: a dead worker's live gauges leave the sums."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gateway.metrics import reap_dead_workers


def test_dead_workers_live_gauges_are_dropped(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = os.getpid()
    for pid in (dead.pid, alive):
        for kind in ("gauge_livesum", "gauge_liveall", "counter"):
            (tmp_path / f"{kind}_{pid}.db").write_bytes(b"")
    reap_dead_workers(str(tmp_path))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(
        [
            f"counter_{dead.pid}.db",
            f"counter_{alive}.db",
            f"gauge_liveall_{alive}.db",
            f"gauge_livesum_{alive}.db",
        ]
    )
