"""Child processes and ports: what `mss up` and the scheduler both need.

Children are started in their own session (so a Ctrl-C on the terminal
reaches the parent alone, which stops them in order) with the Linux parent
death signal set to SIGTERM: if the parent dies, even by SIGKILL, the kernel
tells each child to drain and exit, so no orphan outlives its parent. The
death signal fires when the *thread* that forked the child ends, so children
must be spawned from the event loop's thread, never from a worker thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for a child: SIGTERM it when the parent dies. Runs between fork and exec."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def port_is_free(host: str, port: int) -> bool:
    """Whether `port` can be bound on `host` now (it may be taken a moment later)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel picked as free on `host`; for tests and benchmarks."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


EXIT_REASON_ENV = "MSS_EXIT_REASON_FILE"
"""Names the file in which a child says in one line why it exits (its supervisor reads it)."""


def write_exit_reason(reason: str) -> None:
    """Leave `reason` where this process's supervisor looks (when it gave a place)."""
    path = os.environ.get(EXIT_REASON_ENV)
    if not path:
        return
    try:
        with open(path, "w") as f:
            f.write(reason.replace("\n", " ")[:300])
    except OSError:
        pass  # the reason is in the log anyway


def read_exit_reason(path: str) -> str:
    """What a child left with `write_exit_reason`; empty when nothing (or unreadable)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""
