"""The `mss` command: one subcommand per process role, plus `up`, `status`, `scale` and `keys`.

Each role's package exposes `add_arguments(parser)` and `run(args) -> int` in
its `main` module; `module:name` instead names an object in a module that
offers the same two (the admin commands share `controller/admin_cli.py`). This
file only wires them together and imports lazily so `mss gateway` never pays
for importing the engine.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("mss.up", "controller, one scheduler, gateway and the configured replicas here"),
    "controller": ("controller.main", "run the head controller"),
    "scheduler": ("scheduler.main", "run a node scheduler"),
    "gateway": ("gateway.main", "run the HTTP/SSE gateway"),
    "replica": ("replica.main", "run one replica (engine + gRPC server)"),
    "status": ("controller.admin_cli:status", "print nodes, deployments and replicas"),
    "scale": ("controller.admin_cli:scale", "set a deployment's replica count"),
    "certs": ("mss.certs", "make a local CA and per-role TLS certificates"),
    "keys": ("gateway.keys_cli", "make API keys and their hashed config entries"),
}


GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"
"""gRPC's sockets are polled by the thread that polls its completion queue
(gRPC's own iomgr poller) instead of handed across EventEngine's thread
pool. A message and its answer between two processes then take 10-12
context switches instead of 17 and about two thirds of the CPU
(`python -m loadtest.grpc_hops`); beside an engine whose worker threads
meet at a barrier in every operation, fewer wakes leave it its cores.
gRPC reads this when it is first imported, so it is set before a role's
modules are; a value the operator set wins."""


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mss", description="Distributed LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage and exits
        return 2
    target, help_text = COMMANDS[argv[0]]
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    command = getattr(module, name) if name else module
    role = argparse.ArgumentParser(prog=f"mss {argv[0]}", description=help_text)
    command.add_arguments(role)
    args = role.parse_args(argv[1:])
    return int(command.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
