"""Session-wide fixtures: the real engine starts once per test session and is shared."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import grpc
import pytest

from tests.kube_render import missing
from tests.support import Proc, health, start_redis, start_replica, wait_ready


@pytest.fixture(scope="session")
def real_replica() -> Iterator[Proc]:
    """A replica running the real vLLM engine with the bundled model.

    While it loads, Health is polled and its answers are kept in
    `proc.extra["health_while_loading"]`, so a test can check that the replica
    said "not ready" before the engine was up.
    """
    proc = start_replica(engine="vllm", wait=False)
    seen: list[bool] = []
    deadline = time.monotonic() + 60
    while not seen and time.monotonic() < deadline and proc.alive():
        try:
            seen.append(health(proc.address, timeout=1.0).ready)
        except grpc.RpcError:
            time.sleep(0.05)
    proc.extra["health_while_loading"] = seen
    try:
        wait_ready(proc, 420)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def fake_replica() -> Iterator[Proc]:
    proc = start_replica(engine="fake", token_interval_ms=5)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """Path of `redis-server` (Debian's redis-server package); missing: a failure under
    CI=true, else a skip."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server is not installed (Debian's redis-server package; .ci/run adds it)")
    return binary


@pytest.fixture(scope="session")
def redis_server(redis_binary: str) -> Iterator[Proc]:
    """One throwaway Redis for the session (`proc.address` is its URL); tests use keys of
    their own on it."""
    proc = start_redis(redis_binary)
    try:
        yield proc
    finally:
        proc.stop()
