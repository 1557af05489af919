"""The real-engine benchmark's CPU split: a child's time goes to the process that
started it, and a process vLLM names as its worker or engine core gets its own row,
wherever in the tree it runs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import psutil

from loadtest.bench_vs_vllm import cpu_by_role

# A parent that starts two children which spin for half a second then sleep; the
# second renames itself the way vLLM's worker process does.
SPIN = "import time\nend = time.monotonic() + 0.5\nwhile time.monotonic() < end: pass\n"
TREE = f"""
import subprocess, sys, time
spin = {SPIN!r}
named = "import ctypes\\nctypes.CDLL(None).prctl(15, b'VLLM::Worker', 0, 0, 0)\\n" + spin
subprocess.Popen([sys.executable, "-c", spin + "time.sleep(30)"])
subprocess.Popen([sys.executable, "-c", named + "time.sleep(30)"])
time.sleep(30)
"""


def test_children_count_to_their_parent_and_vllm_s_processes_to_their_role() -> None:
    parent = subprocess.Popen([sys.executable, "-c", TREE])
    try:
        deadline = time.monotonic() + 20
        used = cpu_by_role({"server": parent.pid})
        while time.monotonic() < deadline and min(used.get("worker", 0), used["server"]) < 0.4:
            time.sleep(0.1)
            used = cpu_by_role({"server": parent.pid})
        assert len(psutil.Process(parent.pid).children(recursive=True)) == 2
        # Each spinning child used about half a second; the renamed one is the
        # worker's, the other is added to its parent's.
        assert set(used) == {"server", "worker"}
        assert used["worker"] >= 0.4
        assert used["server"] >= 0.4
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        parent.kill()
        parent.wait()
