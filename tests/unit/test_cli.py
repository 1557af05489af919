"""The `mss` command's process-wide settings."""

from __future__ import annotations

import os

import pytest

from mss import cli


def test_a_role_starts_with_grpc_polling_its_own_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["status", "--help"])
    assert os.environ["GRPC_EXPERIMENTS"] == "-event_engine_client,-event_engine_listener"


def test_the_operators_grpc_experiments_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPC_EXPERIMENTS", "")
    with pytest.raises(SystemExit):
        cli.main(["status", "--help"])
    assert os.environ["GRPC_EXPERIMENTS"] == ""
