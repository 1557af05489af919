"""Replicas following the load: a locust ramp up, down, to nothing and back, against `mss up`.

Starts the system on free loopback ports with one autoscaled fake-engine
deployment (0 to 5 replicas, 8 ongoing requests per replica, each replica
taking 3 s to load), runs locust headless with loadtest/locust_ramp.py's shape
(under 3 minutes), asks the controller for its status every second, and writes
under `loadtest/results/<time>-autoscale/`: locust's CSV and HTML reports,
`throughput.csv`, `replicas.csv` (target, running, ongoing and held requests
per second) and `autoscale.png`: offered load, replicas and TTFT p95 over time.

    python -m loadtest.autoscale                   # --peak-users 40
    python -m loadtest.autoscale --png docs/img/autoscaling-fake.png
    python -m loadtest.autoscale --redraw loadtest/results/<run>   # the plot again, no run
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import matplotlib
import yaml

from loadtest import plots
from loadtest.locust_ramp import END_S
from loadtest.run_locust import RESULTS, ROOT, System
from mss.config import SecuritySettings
from mss.rpc import UNARY_CHANNEL_OPTIONS
from mss.rpc_auth import sync_channel
from mss.security import load_credentials
from protos import controller_pb2 as pb
from protos import controller_pb2_grpc

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MODEL = "echo"
AUTOSCALING = {
    "min_replicas": 0,
    "max_replicas": 5,
    "target_ongoing_requests": 8,
    "upscale_delay_s": 3,
    "downscale_delay_s": 10,
    "downscale_to_zero_delay_s": 15,
    "cold_start_timeout_s": 60,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.autoscale", description=__doc__)
    parser.add_argument("--peak-users", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, help="results folder")
    parser.add_argument("--png", type=Path, help="also copy the plot here")
    parser.add_argument("--redraw", type=Path, help="only plot this earlier run's results")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-autoscale"
    return args


def write_config(out: Path) -> Path:
    config = {
        "deployments": [
            {
                "name": MODEL,
                "model": "fake",
                "engine": "fake",
                "engine_args": {"token_interval_ms": 20, "load_delay_s": 3},
                "resources": {"cpus": 0.1, "memory_gib": 0.2},
                "limits": {"max_in_flight": 1024, "max_queue": 4096, "max_tokens": 4096},
                "autoscaling": AUTOSCALING,
            }
        ],
        "controller": {"metrics_port": 0, "drain_timeout_s": 5, "heartbeat_interval_s": 1},
        "gateway": {"host": "127.0.0.1"},
    }
    path = out / "system.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sample_replicas(controller: str, path: Path, stop: threading.Event) -> None:
    """One row a second: Unix time, target, running, ongoing and held requests."""
    creds = load_credentials(SecuritySettings(), "admin", create=False)
    with (
        sync_channel(controller, creds, "controller", UNARY_CHANNEL_OPTIONS) as channel,
        path.open("w") as out,
    ):
        stub = controller_pb2_grpc.ControllerStub(channel)
        out.write("timestamp,target,running,ongoing,held\n")
        while not stop.wait(1.0):
            try:
                status = stub.Status(pb.StatusRequest(), timeout=2, metadata=creds.metadata())
            except grpc.RpcError:
                continue
            for d in status.deployments:
                if d.name == MODEL:
                    a = d.autoscaling
                    out.write(
                        f"{time.time():.3f},{d.target_replicas},{d.running_replicas},"
                        f"{a.ongoing_requests:g},{a.held_requests}\n"
                    )
            out.flush()


def run_locust(url: str, out: Path, args: argparse.Namespace) -> int:
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest" / "locust_ramp.py"),
        "--headless",
        "--host",
        url,
        "--stop-timeout",
        "30",
        "--csv",
        str(out / "locust"),
        "--csv-full-history",
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--model",
        MODEL,
        "--max-tokens",
        str(args.max_tokens),
        "--tokens-csv",
        str(out / "throughput.csv"),
    ]
    env = {**os.environ, "MSS_PEAK_USERS": str(args.peak_users)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(cmd, cwd=ROOT, env=env, timeout=END_S + 120).returncode


def _rows(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _gaps(t: list[float], values: list[float]) -> tuple[list[float], list[float]]:
    """The series with a break (NaN) wherever no sample came for over 2 s (no traffic)."""
    xs: list[float] = []
    ys: list[float] = []
    for i, (x, y) in enumerate(zip(t, values, strict=True)):
        if i and x - t[i - 1] > 2.0:
            xs.append(x)
            ys.append(float("nan"))
        xs.append(x)
        ys.append(y)
    return xs, ys


def draw(out: Path) -> str:
    """autoscale.png: users and requests/s, replicas, TTFT p95 against time; a summary.

    Time 0 is locust's start (the first row of throughput.csv, written once a second)."""
    load = _rows(out / "throughput.csv")
    start = load[0]["timestamp"] - 1.0
    replicas = _rows(out / "replicas.csv")
    history = plots.read_history(out / "locust_stats_history.csv", start=start)
    ttft = history.get("TTFT")
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True, dpi=90)
    ax = axes[0]
    ax.plot([r["timestamp"] - start for r in load], [r["users"] for r in load], label="users")
    ax.plot(
        [r["timestamp"] - start for r in load],
        [r["requests_per_s"] for r in load],
        label="requests/s finished",
    )
    ax.set_ylabel("offered load")
    ax.legend(loc="upper right")
    ax = axes[1]
    t = [r["timestamp"] - start for r in replicas]
    ax.step(t, [r["running"] for r in replicas], where="post", label="running")
    ax.step(t, [r["target"] for r in replicas], where="post", label="target", linestyle="--")
    ax.set_ylabel("replicas")
    ax.legend(loc="upper right")
    ax = axes[2]
    if ttft is not None:
        xs, ys = _gaps(ttft.t, [v / 1000 for v in ttft.values["95%"]])
        ax.plot(xs, ys, color="tab:orange", label="p95 (gaps: no request)")
        ax.legend(loc="upper left")
    ax.set_ylabel("TTFT p95 (s)")
    ax.set_xlabel("seconds since start")
    fig.suptitle(
        "Autoscaling, fake engine (3 s model load): 0-5 replicas, 8 ongoing requests each",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "autoscale.png")
    plt.close(fig)
    peak = max((r["running"] for r in replicas), default=0)
    zero = [r["timestamp"] - start for r in replicas if r["target"] == 0 and r["running"] == 0]
    failures = requests = 0
    with (out / "locust_stats.csv").open() as f:
        for row in csv.DictReader(f):
            if row["Type"] == "SSE":
                requests += int(row["Request Count"])
                failures += int(row["Failure Count"])
    return (
        f"streams {requests}, failed {failures}; peak {peak:g} running replicas; "
        f"at zero for {len(zero)} s of the run\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.redraw is not None:
        sys.stdout.write(draw(args.redraw))
        if args.png:
            args.png.write_bytes((args.redraw / "autoscale.png").read_bytes())
        return 0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    system = System(argparse.Namespace(config=str(write_config(out))), out)
    stop = threading.Event()
    try:
        system.wait_ready(120)
        controller = f"127.0.0.1:{system.controller_port}"
        sampler = threading.Thread(
            target=sample_replicas, args=(controller, out / "replicas.csv", stop), daemon=True
        )
        sampler.start()
        code = run_locust(system.url, out, args)
        stop.set()
        sampler.join(5)
    finally:
        stop.set()
        system.stop()
    summary = draw(out)
    if args.png:
        args.png.write_bytes((out / "autoscale.png").read_bytes())
    sys.stdout.write(summary + f"results: {out}\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
