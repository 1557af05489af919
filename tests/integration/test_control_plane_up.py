"""`mss up` with a fake-engine config of two models: ready, serves both, Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import yaml

from tests.support import ROOT, engine_env, free_port


def chat(url: str, model: str) -> dict[str, object]:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    last: dict[str, object] = {}
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/{model}", json=body, timeout=30) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                last = orjson.loads(line[6:])
                tokens += not last.get("finished")
    last["tokens"] = tokens
    return last


def test_mss_up_serves_two_models_and_stops_cleanly(tmp_path: Path) -> None:
    gateway_port, controller_port = free_port(), free_port()
    base = 41000 + (os.getpid() % 50) * 100
    config = {
        "deployments": [
            {
                "name": "echo",
                "model": "fake",
                "engine": "fake",
                "replicas": 2,
                "resources": {"cpus": 0.1, "memory_gib": 0.1},
            },
            {
                "name": "echo-small",
                "model": "fake",
                "engine": "fake",
                "replicas": 1,
                "resources": {"cpus": 0.1, "memory_gib": 0.1},
                "routing": "round_robin",
            },
        ],
        "controller": {"port": controller_port, "metrics_port": 0, "drain_timeout_s": 5},
        "gateway": {"port": gateway_port},
    }
    path = tmp_path / "up.yaml"
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
            "0",
            "--replica-ports",
            f"{base}-{base + 49}",
            "--replica-metrics-ports",
            f"{base + 50}-{base + 99}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            if "Ctrl-C stops everything" in line:  # the last line of the ready message
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), "".join(lines[-60:])
        output = "".join(lines)
        assert f"curl -N -X POST http://127.0.0.1:{gateway_port}/v1/chat/echo" in output
        assert "scheduler  | " in output and "controller | " in output
        url = f"http://127.0.0.1:{gateway_port}"
        for model in ("echo", "echo-small"):
            final = chat(url, model)
            assert final["finished"] and final["finish_reason"] == "length", final
            assert final["tokens"] == 5
        deadline = time.monotonic() + 20
        while True:  # ready means each model has a replica; wait for all three
            status = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mss.cli",
                    "status",
                    "--controller",
                    f"127.0.0.1:{controller_port}",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=ROOT,
                env=env,
                check=True,
            ).stdout
            if "echo        2/2" in status or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert "echo-small  1/1" in status and "echo        2/2" in status, status
        pids = [
            int(line.split("pid ")[1].split(")")[0])
            for line in lines
            if "started replica" in line and "(pid " in line
        ]
        assert len(pids) == 3

        started = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(30) == 0, "".join(lines[-40:])
        assert time.monotonic() - started < 30
        reader.join(5)
        output = "".join(lines)
        assert "stopping: gateway, then scheduler" in output and "up         | stopped" in output
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive = not open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"
            except (ProcessLookupError, FileNotFoundError):
                alive = False
            assert not alive, f"replica {pid} outlived mss up"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
