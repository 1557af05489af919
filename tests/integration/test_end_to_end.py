"""The real bundled model end to end: through the gateway, and through `mss up`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.support import ROOT, Proc, engine_env, free_port, spawn

pytestmark = pytest.mark.engine

QUESTION = "What is the capital of France?"


def wait_http_ready(url: str, proc: Proc | subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = proc.alive() if isinstance(proc, Proc) else proc.poll() is None
        if not running:
            raise RuntimeError(f"process exited before {url} was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def wait_for_line(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None:
            raise RuntimeError(f"process exited before printing {text!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not printed within {timeout:.0f} s")
        time.sleep(0.2)


def stream_chat(base: str, model: str, body: dict[str, object]) -> tuple[str, dict[str, object]]:
    """POST /v1/chat/<model> and read the SSE events as curl -N would."""
    text, last = "", {}
    with httpx.stream("POST", f"{base}/v1/chat/{model}", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            event = orjson.loads(line[6:])
            if event.get("finished"):
                last = event
                break
            text += event["token"]
    return text, last


@pytest.fixture(scope="module")
def gateway(real_replica: Proc) -> Iterator[str]:
    port = free_port()
    proc = spawn(
        ["gateway", "--replica", f"smollm2={real_replica.address}", "--port", str(port)],
        "gateway-e2e",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(f"{base}/ready", proc, 60)
        yield base
    finally:
        proc.stop()


def test_sse_chat_through_the_gateway(gateway: str) -> None:
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 24}
    text, last = stream_chat(gateway, "smollm2", body)
    assert "Paris" in text
    assert last["finish_reason"] in ("stop", "length")
    usage = last["usage"]
    assert isinstance(usage, dict) and usage["completion_tokens"] > 0


def test_openai_client_streaming_and_not(gateway: str) -> None:
    client = OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=24
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    pieces = []
    usage = None
    for chunk in client.chat.completions.create(
        model="smollm2",
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) > 1 and "Paris" in "".join(pieces)
    assert usage is not None and usage.total_tokens > usage.completion_tokens > 0


def test_mss_up_with_the_bundled_model(tmp_path: Path) -> None:
    """What `make run` runs: controller, scheduler, gateway and one real replica."""
    gateway_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    config = {
        "controller": {"port": free_port(), "metrics_port": 0},
        "gateway": {"port": gateway_port},
    }
    path = tmp_path / "up.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "up.log").open("wb")
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
            f"{grpc_port}-{grpc_port + 20}",
            "--replica-metrics-ports",
            f"{metrics_port}-{metrics_port + 20}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=engine_env(),
        cwd=ROOT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{gateway_port}"
    code: int | None = None
    try:
        wait_http_ready(f"{base}/ready", proc, 420)
        # The gateway may answer /ready a poll before `up` sees the replica running
        # and prints the curl to try; a user waits for that line, and so does this.
        wait_for_line(tmp_path / "up.log", "curl -N -X POST", proc, 60)
        body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0}
        text, last = stream_chat(base, "smollm2", body)
        assert "Paris" in text, text
        assert last["finish_reason"] == "stop"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    output = (tmp_path / "up.log").read_text(errors="replace")
    assert "curl -N -X POST" in output, output[-3000:]
    assert code == 0, output[-3000:]
