"""`mss status` and `mss scale`: wiring in `mss/cli.py` and the status tables."""

from __future__ import annotations

import argparse
import importlib

from controller.admin_cli import Command, render
from mss.cli import COMMANDS
from protos import controller_pb2 as pb


def command(name: str) -> Command:
    module_name, _, attr = COMMANDS[name][0].partition(":")
    found = getattr(importlib.import_module(module_name), attr)
    assert isinstance(found, Command)
    return found


def test_cli_finds_both_admin_commands_and_their_arguments() -> None:
    parser = argparse.ArgumentParser()
    command("scale").add_arguments(parser)
    args = parser.parse_args(["echo", "2", "--controller", "h:1"])
    assert (args.model, args.replicas, args.controller, args.timeout) == ("echo", 2, "h:1", 5.0)
    parser = argparse.ArgumentParser()
    command("status").add_arguments(parser)
    assert parser.parse_args([]).controller == "127.0.0.1:50051"


def test_render_names_states_and_marks_leaving_replicas() -> None:
    status = pb.StatusResponse(
        routing_version=3,
        nodes=[
            pb.NodeStatus(
                node=pb.NodeInfo(node_id="n1", host="h", cpus=4, memory_gib=16),
                alive=True,
                last_heartbeat_unix=99.0,
            )
        ],
        replicas=[
            pb.ReplicaView(
                status=pb.ReplicaStatus(replica_id="echo-1", deployment="echo", state=pb.RUNNING),
                node_id="n1",
                keep=True,
            ),
            pb.ReplicaView(
                status=pb.ReplicaStatus(replica_id="echo-2", deployment="echo", state=pb.STOPPING),
                node_id="n1",
                keep=False,
            ),
        ],
    )
    text = render(status, now=100.0)
    assert text.startswith("routing table v3")
    assert "1.0s ago" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("echo-")}
    assert " running " in lines["echo-1"]
    assert "stopping (leaving)" in lines["echo-2"]
