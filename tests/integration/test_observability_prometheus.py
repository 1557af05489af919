"""Dashboards and alerts proven against a real Prometheus scraping a running system.

`mss up` starts controller, scheduler, a two-worker gateway and three fake-engine
replicas on free ports; a real Prometheus (Debian's `prometheus` package,
installed here when missing) scrapes them every second, finding schedulers and
replicas through the controller's /targets. A bounded mixed load runs (streams
on both chat routes, clients that leave early, invalid requests, a burst past
a model's capacity), and meanwhile every query of every Grafana panel is run
through Prometheus' HTTP API: a query that returns nothing, or only NaN, fails.
The scrape config and the alert rules pass `promtool check`, the alert rules'
own unit tests pass `promtool test rules`, and every rule evaluates cleanly.
The gateway runs two worker processes, so the request counts Prometheus sees
must equal the requests sent: proof that multiprocess metrics add up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import ROOT, engine_env, free_port

PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
RATE_WINDOW = "30s"
LOAD_SECONDS = 24.0
QUERY_AFTER_S = 14.0


def ensure_prometheus() -> tuple[str, str]:
    """Paths of `prometheus` and `promtool`, installing Debian's package when missing."""
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if prom and tool:
        return prom, tool
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.fail("prometheus/promtool are missing and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", "prometheus"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        subprocess.run([apt, "update"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    # The package may start a system service on :9090; this test runs its own instance.
    for stop in (["service", "prometheus", "stop"], ["systemctl", "stop", "prometheus"]):
        if shutil.which(stop[0]):
            subprocess.run(stop, capture_output=True, timeout=60)
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prom and tool):
        pytest.fail(
            "cannot install Debian's prometheus package (needed to prove the dashboards):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    return prom, tool


@pytest.fixture(scope="module")
def prometheus_tools() -> tuple[str, str]:
    return ensure_prometheus()


def test_promtool_checks_config_and_rules(prometheus_tools: tuple[str, str]) -> None:
    _, promtool = prometheus_tools
    for args in (
        ["check", "config", str(PROM_DIR / "prometheus.yml")],
        ["check", "rules", str(PROM_DIR / "alerts.yml")],
        ["test", "rules", str(PROM_DIR / "alerts_test.yml")],
    ):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


@dataclass
class System:
    gateway: str
    controller_metrics: str
    scheduler_metrics: str
    proc: subprocess.Popen[bytes]
    output: list[str]


@contextlib.contextmanager
def running_system(tmp_path: Path) -> Iterator[System]:
    """`mss up` of two fake-engine models on free ports, a two-worker gateway."""
    gateway_port, controller_port = free_port(), free_port()
    controller_metrics, scheduler_metrics = free_port(), free_port()
    base = 45000 + (os.getpid() % 50) * 100
    fake = {"model": "fake", "engine": "fake", "resources": {"cpus": 0.1, "memory_gib": 0.1}}
    config = {
        "deployments": [
            {**fake, "name": "echo", "replicas": 2, "engine_args": {"token_interval_ms": 5}},
            {
                **fake,
                "name": "echo-small",
                "replicas": 1,
                "routing": "round_robin",
                "engine_args": {"token_interval_ms": 20},
                "limits": {"max_in_flight": 2, "max_queue": 1, "max_tokens": 64},
            },
            {  # at zero until the load's first request to it: a cold start
                **fake,
                "name": "echo-auto",
                "engine_args": {"token_interval_ms": 5},
                "autoscaling": {"min_replicas": 0, "max_replicas": 1},
            },
        ],
        "controller": {
            "port": controller_port,
            "metrics_port": controller_metrics,
            "drain_timeout_s": 2,
            "heartbeat_interval_s": 0.5,
        },
        "gateway": {"port": gateway_port, "workers": 2},
    }
    path = tmp_path / "system.yaml"
    path.write_text(yaml.safe_dump(config))
    env = engine_env()
    env["MSS_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mss.cli",
            "up",
            "--config",
            str(path),
            "--scheduler-metrics-port",
            str(scheduler_metrics),
            "--replica-ports",
            f"{base}-{base + 49}",
            "--replica-metrics-ports",
            f"{base + 50}-{base + 99}",
            "--ready-timeout",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    output: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            output.append(line)
            if "ready in" in line:
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.wait(0.2):
            assert proc.poll() is None, "mss up exited:\n" + "".join(output[-80:])
            assert time.monotonic() < deadline, "mss up not ready:\n" + "".join(output[-80:])
        yield System(
            gateway=f"127.0.0.1:{gateway_port}",
            controller_metrics=f"127.0.0.1:{controller_metrics}",
            scheduler_metrics=f"127.0.0.1:{scheduler_metrics}",
            proc=proc,
            output=output,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        reader.join(5)


def prometheus_config(system: System) -> dict[str, Any]:
    """The bundled scrape config, pointed at this system and scraping every second."""
    config: dict[str, Any] = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROM_DIR / "alerts.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["mss-gateway"]["static_configs"] = [{"targets": [system.gateway]}]
    jobs["mss-controller"]["static_configs"] = [{"targets": [system.controller_metrics]}]
    sd = jobs["mss-discovered"]["http_sd_configs"][0]
    sd["url"] = f"http://{system.controller_metrics}/targets"
    sd["refresh_interval"] = "1s"
    return config


@contextlib.contextmanager
def running_prometheus(binary: str, config: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "prometheus exited:\n" + log_path.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "prometheus not ready:\n" + log_path.read_text()
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class LoadReport:
    codes: Counter[int]
    streams_done: int = 0


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], leave: bool) -> int:
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code
        async for _ in resp.aiter_lines():
            if leave:
                return 499  # the client goes away after its first chunk
    return 200


async def run_load(gateway: str, prom: str, seconds: float, report: LoadReport) -> None:
    """Mixed traffic for `seconds`: streams on both routes, early leavers, invalid, bursts."""
    base = f"http://{gateway}"
    deadline = time.monotonic() + seconds
    words = "tell me something about serving language models quickly ".split()

    async def user(n: int, client: httpx.AsyncClient) -> None:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            prompt = " ".join(words[: 1 + (n + i) % len(words)] * (1 + i % 4))
            max_tokens = 4 + (n * 7 + i) % 28
            leave = i % 9 == 0
            if leave:
                max_tokens = 200  # still streaming when the client goes (5 ms a token)
            if (n + i) % 2:
                url = f"{base}/v1/chat/echo"
                body: dict[str, Any] = {
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                }
            else:
                url = f"{base}/v1/chat/completions"
                body = {
                    "model": "echo",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            if i % 13 == 0:
                body["max_tokens"] = 100_000  # above the model's limit: 400, reason invalid
            code = await _stream(client, url, body, leave)
            report.codes[code] += 1
            report.streams_done += 1

    async def cold_start(client: httpx.AsyncClient) -> None:
        # The cold start's panels show an increase: Prometheus must hold a sample of the
        # empty histogram before the start, so wait for it (bounded), then one more scrape.
        params = {"query": "mss_controller_cold_start_seconds_count"}
        until = time.monotonic() + 20
        while time.monotonic() < until:
            reply = await client.get(f"{prom}/api/v1/query", params=params)
            if reply.status_code == 200 and reply.json()["data"]["result"]:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.5)
        body = {"messages": [{"role": "user", "content": "wake up"}], "max_tokens": 4}
        report.codes[await _stream(client, f"{base}/v1/chat/echo-auto", body, False)] += 1

    async def burst(client: httpx.AsyncClient) -> None:
        # echo-small admits 2 and queues 1 per gateway worker: the rest are 503 capacity.
        while time.monotonic() < deadline - 2:
            body = {"messages": [{"role": "user", "content": "burst"}], "max_tokens": 40}
            codes = await asyncio.gather(
                *(_stream(client, f"{base}/v1/chat/echo-small", body, False) for _ in range(10))
            )
            report.codes.update(codes)
            await asyncio.sleep(1.5)

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(
            *(user(n, client) for n in range(8)), burst(client), cold_start(client)
        )


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) for every target of every committed dashboard."""
    out = []
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", RATE_WINDOW)
                out.append((path.name, panel["title"], expr.replace("$model", ".*")))
    return out


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    assert reply.status_code == 200, f"{expr}: {reply.text}"
    body = reply.json()
    assert body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def check_panels(prom: str) -> list[str]:
    """Every panel query that returns no series or only NaN, with the reason."""
    failures = []
    for board, title, expr in panel_queries():
        result = query(prom, expr)
        if not result:
            failures.append(f"{board} / {title}: no data for {expr}")
        elif not finite(result):
            failures.append(f"{board} / {title}: only NaN for {expr}")
    return failures


def test_every_dashboard_query_returns_data_from_real_prometheus(
    prometheus_tools: tuple[str, str], tmp_path: Path
) -> None:
    prometheus, _ = prometheus_tools
    assert len(panel_queries()) >= 40
    with (
        running_system(tmp_path) as system,
        running_prometheus(prometheus, prometheus_config(system), tmp_path) as prom,
    ):
        report = LoadReport(codes=Counter())
        load = threading.Thread(
            target=lambda: asyncio.run(run_load(system.gateway, prom, LOAD_SECONDS, report)),
            name="load",
        )
        started = time.monotonic()
        load.start()
        try:
            # Discovery: the controller hands Prometheus one scheduler and four replicas
            # (echo-auto's after its cold start).
            targets: dict[str, list[dict[str, Any]]] = {}
            while time.monotonic() - started < QUERY_AFTER_S:
                reply = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()
                targets = {}
                for target in reply["data"]["activeTargets"]:
                    targets.setdefault(target["labels"]["job"], []).append(target)
                time.sleep(1.0)
            jobs = {job: sorted(t["health"] for t in found) for job, found in targets.items()}
            assert jobs == {
                "mss-gateway": ["up"],
                "mss-controller": ["up"],
                "mss-scheduler": ["up"],
                "mss-replica": ["up", "up", "up", "up"],
            }, json.dumps(targets, indent=1)[:4000]
            replica_labels = sorted(
                (t["labels"]["deployment"], t["labels"]["node"]) for t in targets["mss-replica"]
            )
            assert [d for d, _ in replica_labels] == ["echo", "echo", "echo-auto", "echo-small"]

            # While the load runs: every panel has data.
            failures = check_panels(prom)
            if failures:  # one more scrape round before failing, for the slowest series
                time.sleep(3)
                failures = check_panels(prom)
            assert not failures, "\n".join(failures)
        finally:
            load.join(LOAD_SECONDS + 30)
        assert not load.is_alive()
        codes = report.codes
        assert codes[200] > 50 and codes[499] > 0 and codes[400] > 0 and codes[503] > 0, codes

        # Every request is counted once, whichever of the two gateway workers served it.
        sent = sum(codes.values())
        counted = 0.0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            result = query(prom, 'sum(mss_gateway_requests_total{job="mss-gateway"})')
            counted = float(result[0]["value"][1]) if result else 0.0
            if counted == sent:
                break
            time.sleep(1)
        assert counted == sent, (counted, codes)
        by_code = {
            int(s["metric"]["code"]): float(s["value"][1])
            for s in query(prom, "sum by (code) (mss_gateway_requests_total)")
        }
        assert by_code == {code: float(n) for code, n in codes.items()}, (by_code, codes)

        # Every alert rule evaluates without error against the live series.
        rules = httpx.get(f"{prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
        evaluated = [r for g in rules for r in g["rules"]]
        assert len(evaluated) >= 7
        bad = [(r["name"], r.get("lastError")) for r in evaluated if r["health"] != "ok"]
        assert not bad, bad
        firing = [r["name"] for r in evaluated if r.get("state") == "firing"]
        assert not firing, firing
