"""Scale from zero: time from a request to its first token when no replica runs, and warm.

Starts `mss up` on free loopback ports with one autoscaled deployment at zero
replicas (`min_replicas: 0`, scale to zero after `--idle` seconds without a
request), then, `--rounds` times: waits until the controller reports zero
replicas, sends one streaming request (held by the gateway while a replica
starts), and times its first token; then a second request on the warm
replica. Prints a Markdown table for docs/benchmarks.md, and JSON lines with
`--out`.

    python -m loadtest.bench_cold_start --engine vllm   # the bundled model (run on a quiet machine)
    python -m loadtest.bench_cold_start --engine fake   # the fake engine, a 3 s simulated load

The bundled model's very first start also converts it from GGUF (once, cached
under ~/.cache/mss/models); the first round includes that unless the cache
is warm. Every round after it is a plain cold start: process, engine, model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import yaml

from loadtest.run_locust import System
from mss.config import SecuritySettings
from mss.rpc import UNARY_CHANNEL_OPTIONS
from mss.rpc_auth import sync_channel
from mss.security import load_credentials
from protos import controller_pb2 as pb
from protos import controller_pb2_grpc

MODEL = "cold"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_cold_start", description=__doc__
    )
    parser.add_argument("--engine", choices=["vllm", "fake"], default="vllm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds to zero when idle")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cold-start-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, help="write one JSON line per request here")
    return parser.parse_args(argv)


def write_config(args: argparse.Namespace, folder: Path) -> Path:
    deployment: dict[str, object] = {
        "name": MODEL,
        "autoscaling": {
            "min_replicas": 0,
            "max_replicas": 1,
            "downscale_delay_s": args.idle,
            "downscale_to_zero_delay_s": args.idle,
            "cold_start_timeout_s": args.cold_start_timeout,
        },
    }
    if args.engine == "fake":
        deployment.update(
            model="fake",
            engine="fake",
            engine_args={"load_delay_s": 3},
            resources={"cpus": 0.1, "memory_gib": 0.2},
        )
    else:
        deployment.update(resources={"cpus": 1, "memory_gib": 3})
    config = {
        "deployments": [deployment],
        "controller": {"metrics_port": 0, "heartbeat_interval_s": 1, "drain_timeout_s": 5},
    }
    path = folder / "cold-start.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def first_token(url: str, max_tokens: int, timeout: float) -> tuple[float, float, str]:
    """(seconds to the first token, seconds to the end, the text) of one streamed request."""
    body = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    started = time.perf_counter()
    first = 0.0
    text = ""
    with (
        httpx.Client(timeout=timeout) as http,
        http.stream("POST", f"{url}/v1/chat/{MODEL}", json=body) as resp,
    ):
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {resp.read().decode(errors='replace')}")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue  # the keep-alive comments sent while the request is held
            event = json.loads(line[6:])
            if "error" in event or event.get("finish_reason") == "error":
                raise RuntimeError(f"stream failed: {event}")
            if event.get("token") and not first:
                first = time.perf_counter() - started
            text += event.get("token", "")
    return first, time.perf_counter() - started, text


def wait_zero(stub: controller_pb2_grpc.ControllerStub, metadata: object, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            status = stub.Status(pb.StatusRequest(), timeout=2, metadata=metadata)
            if not status.replicas and all(d.target_replicas == 0 for d in status.deployments):
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the deployment did not scale to zero within {within:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="mss-cold-start-"))
    system = System(argparse.Namespace(config=str(write_config(args, folder))), folder)
    rows: list[dict[str, object]] = []
    try:
        system.wait_ready(120)
        creds = load_credentials(SecuritySettings(), "admin", create=False)
        controller = f"127.0.0.1:{system.controller_port}"
        with sync_channel(controller, creds, "controller", UNARY_CHANNEL_OPTIONS) as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            for n in range(args.rounds):
                wait_zero(stub, creds.metadata(), args.idle * 4 + 60)
                for kind in ("cold", "warm"):
                    ttft, total, text = first_token(
                        system.url, args.max_tokens, args.cold_start_timeout + 60
                    )
                    row: dict[str, object] = {
                        "round": n + 1,
                        "kind": kind,
                        "ttft_s": ttft,
                        "total_s": total,
                    }
                    rows.append(row)
                    sys.stdout.write(f"{json.dumps(row)} {text[:40]!r}\n")
                    sys.stdout.flush()
    finally:
        system.stop()
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cold = [float(r["ttft_s"]) for r in rows if r["kind"] == "cold"]  # type: ignore[arg-type]
    warm = [float(r["ttft_s"]) for r in rows if r["kind"] == "warm"]  # type: ignore[arg-type]
    sys.stdout.write(
        "\n| engine | rounds | cold TTFT each (s) | cold median (s) | warm TTFT median (s) |\n"
        "|---|---|---|---|---|\n"
        f"| {args.engine} | {len(cold)} | {', '.join(f'{c:.2f}' for c in cold)} | "
        f"{statistics.median(cold):.2f} | {statistics.median(warm):.3f} |\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
