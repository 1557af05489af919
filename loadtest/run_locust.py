"""`make loadtest`: a bounded, ramped locust run against a local system, with reports and plots.

Starts the whole system with `mss up` on free loopback ports (the fake engine
by default; `--engine vllm` serves the bundled model), runs locust headless
with the users of loadtest/locustfile.py while the user count ramps up over
the first three quarters of the run and holds for the last, then stops
everything and writes under `loadtest/results/<time>-<engine>/`:

- `locust_stats.csv`, `locust_stats_history.csv`, `locust_failures.csv`, ...
  and `report.html` (locust's own reports; TTFT and ITL are their own entries);
- `throughput.csv`: users, requests/s and output tokens/s each second;
- `gateway_metrics.txt`: the gateway's /metrics at the end of the run;
- `summary.png` (TTFT and ITL p50/p95/p99 and tokens/s over time, with the user
  count), `vs_users.png` (the same against the user count) and `summary.md`.

    python -m loadtest.run_locust                       # fake engine, up to 200 users, 60 s
    python -m loadtest.run_locust --engine vllm         # bundled model, up to 32 users, 90 s
    python -m loadtest.run_locust --gateway http://127.0.0.1:8000   # a system already running
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from loadtest import plots

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtest" / "results"
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
DEFAULTS = {
    # engine: (users, run time s, max_tokens, replicas)
    "fake": (200, 60, 64, 2),
    "vllm": (32, 90, 32, 1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run_locust", description=__doc__)
    parser.add_argument("--engine", choices=sorted(DEFAULTS), default="fake")
    parser.add_argument("--users", type=int, help="peak users (200 fake, 32 vllm)")
    parser.add_argument("--run-time", type=int, help="seconds of load (60 fake, 90 vllm)")
    parser.add_argument("--ramp-share", type=float, default=0.75, help="share of time ramping")
    parser.add_argument("--max-tokens", type=int, help="per request (64 fake, 32 vllm)")
    parser.add_argument("--replicas", type=int, help="replicas of the model (2 fake, 1 vllm)")
    parser.add_argument("--token-interval-ms", type=float, default=20.0, help="fake engine only")
    parser.add_argument("--model", default="smollm2", help="deployment name clients use")
    parser.add_argument("--config", help="deployments file for mss up instead of the generated one")
    parser.add_argument("--gateway", help="URL of a running gateway: start nothing")
    parser.add_argument("--out", type=Path, help="results folder")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    users, run_time, max_tokens, replicas = DEFAULTS[args.engine]
    args.users = args.users or users
    args.run_time = args.run_time or run_time
    args.max_tokens = args.max_tokens or max_tokens
    args.replicas = args.replicas or replicas
    if args.out is None:
        args.out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.engine}"
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_range(count: int, start: int = 30000) -> str:
    """A run of `count` consecutive loopback ports that are free now."""
    port = start + (os.getpid() % 100) * 50
    while port + count < 60000:
        block = range(port, port + count)
        if all(_port_free(p) for p in block):
            return f"{block.start}-{block.stop - 1}"
        port += count
    raise RuntimeError("no free port range")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def system_config(args: argparse.Namespace) -> dict[str, object]:
    deployment: dict[str, object] = {
        "name": args.model,
        "replicas": args.replicas,
        "limits": {"max_in_flight": 1024, "max_queue": 4096, "max_tokens": 4096},
    }
    if args.engine == "fake":
        deployment.update(
            model="fake",
            engine="fake",
            engine_args={"token_interval_ms": args.token_interval_ms},
            resources={"cpus": 0.1, "memory_gib": 0.2},
        )
    else:
        deployment.update(resources={"cpus": 1, "memory_gib": 3})
    return {
        "deployments": [deployment],
        "controller": {"port": free_port(), "metrics_port": 0, "drain_timeout_s": 5},
        "gateway": {"port": free_port()},
    }


class System:
    """`mss up` in its own process group, its output in a log file."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.log_path = out / "system.log"
        if args.config:
            config_path = Path(args.config)
            self.port, self.controller_port = free_port(), free_port()
            extra = ["--port", str(self.port), "--controller-port", str(self.controller_port)]
        else:
            config = system_config(args)
            config_path = out / "system.yaml"
            config_path.write_text(yaml.safe_dump(config))
            self.port = config["gateway"]["port"]  # type: ignore[index]
            self.controller_port = config["controller"]["port"]  # type: ignore[index]
            extra = []
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [
            sys.executable,
            "-m",
            "mss.cli",
            "up",
            "--config",
            str(config_path),
            *extra,
            "--scheduler-metrics-port",
            "0",
            "--replica-ports",
            free_range(20),
            "--replica-metrics-ports",
            free_range(20, start=40000),
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mss up exited:\n{self.log_path.read_text()[-3000:]}")
            if "ready in" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"mss up not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def run_locust(args: argparse.Namespace, url: str, out: Path) -> int:
    spawn_rate = max(args.users / max(args.run_time * args.ramp_share, 1.0), 0.1)
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        url,
        "--users",
        str(args.users),
        "--spawn-rate",
        f"{spawn_rate:.3f}",
        "--run-time",
        f"{args.run_time}s",
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
        args.model,
        "--max-tokens",
        str(args.max_tokens),
        "--tokens-csv",
        str(out / "throughput.csv"),
    ]
    # Locust exits 1 when any request failed; the reports say which.
    return subprocess.run(cmd, cwd=ROOT, timeout=args.run_time + 120).returncode


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    system: System | None = None
    try:
        if args.gateway:
            url = args.gateway.rstrip("/")
        else:
            system = System(args, out)
            sys.stdout.write(
                f"starting the system ({args.engine} engine); log: {system.log_path}\n"
            )
            sys.stdout.flush()
            system.wait_ready(args.ready_timeout)
            url = system.url
        sys.stdout.write(
            f"locust: up to {args.users} users over {args.run_time} s, "
            f"max_tokens {args.max_tokens}, against {url}\n"
        )
        sys.stdout.flush()
        code = run_locust(args, url, out)
        try:
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            (out / "gateway_metrics.txt").write_text(metrics)
        except httpx.HTTPError as exc:
            sys.stderr.write(f"could not read the gateway's /metrics: {exc}\n")
    finally:
        if system is not None:
            system.stop()
    title = (
        f"{args.engine} engine, {args.replicas if not args.gateway else '?'} replica(s), "
        f"up to {args.users} users, max_tokens {args.max_tokens}"
    )
    summary = plots.draw(out, title)
    (out / "summary.md").write_text(summary)
    sys.stdout.write(summary + f"\nresults: {out}\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
