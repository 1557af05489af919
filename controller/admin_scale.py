"""`mss scale MODEL N`: set how many replicas a deployment runs."""

from __future__ import annotations

import argparse
import sys

import grpc

from protos import controller_pb2 as pb
from protos import controller_pb2_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="deployment name")
    parser.add_argument("replicas", type=int, help="replica count wanted (0 or more)")
    parser.add_argument("--controller", default="127.0.0.1:50051", help="controller HOST:PORT")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")


def run(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.controller) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        try:
            reply = stub.Scale(
                pb.ScaleRequest(deployment=args.model, replicas=args.replicas), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            sys.stderr.write(f"mss scale: {exc.details()}\n")
            return 1
    d = reply.deployment
    sys.stdout.write(
        f"{d.name}: target {d.target_replicas} replicas ({d.running_replicas} running now)\n"
    )
    return 0
