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


def test_render_shows_the_autoscaler_and_scaled_to_zero() -> None:
    status = pb.StatusResponse(
        deployments=[
            pb.DeploymentStatus(
                name="echo",
                target_replicas=0,
                running_replicas=0,
                engine="fake",
                autoscaling=pb.AutoscalingStatus(
                    min_replicas=0,
                    max_replicas=4,
                    last_direction="hold",
                    last_reason="scaled to zero; no request",
                    last_change_unix=40.0,
                ),
            ),
            pb.DeploymentStatus(name="fixed", target_replicas=2, running_replicas=2),
        ]
    )
    text = render(status, now=100.0)
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "0/0" in rows["echo"] and "0..4, 0 ongoing, scaled to zero" in rows["echo"]
    assert rows["fixed"].split()[1:3] == ["2/2", "-"]
    assert "echo: hold: scaled to zero; no request; target last changed 60s ago" in text
