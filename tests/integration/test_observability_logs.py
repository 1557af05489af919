"""Request tracing in logs: one X-Request-Id followed from the gateway into the replica.

Real processes (a fake-engine replica and `mss gateway`) with JSON logs at
debug level: the id a client sends is echoed back, is the request id the
replica sees, and appears on the log lines about that request on both sides;
the prompt text appears in neither log.
"""

from __future__ import annotations

import time

import httpx
import orjson

from tests.support import Proc, free_port, spawn, start_replica

PROMPT = "zanzibar-quokka-secret-prompt please tell me about tracing"
MODEL = "smollm2"


def json_lines(text: str) -> list[dict[str, object]]:
    """Every log line that is a JSON object (a JSON log file has nothing else)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(orjson.loads(line))
    return out


def start_gateway(replica: Proc) -> Proc:
    port = free_port()
    proc = spawn(
        [
            "gateway",
            "--port",
            str(port),
            "--replica",
            f"{MODEL}={replica.address}",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ],
        f"gateway-{port}",
    )
    proc.address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.alive(), proc.log()[-3000:]
        try:
            if httpx.get(proc.address + "/ready", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"gateway not ready:\n{proc.log()[-3000:]}")


def test_request_id_in_gateway_and_replica_json_logs_without_prompt() -> None:
    json_debug = ["--log-format", "json", "--log-level", "debug"]
    replica = start_replica(engine="fake", token_interval_ms=2, extra_args=json_debug)
    gateway: Proc | None = None
    try:
        gateway = start_gateway(replica)
        rid = "trace-7f3a9c01"
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}
        with httpx.stream(
            "POST",
            f"{gateway.address}/v1/chat/{MODEL}",
            json=body,
            headers={"X-Request-Id": rid},
            timeout=30,
        ) as resp:
            assert resp.status_code == 200
            assert resp.headers["x-request-id"] == rid
            text = "".join(resp.iter_text())
        assert '"finished":true' in text.replace(" ", "")

        # An aborted request is logged too (the replica says so at info level).
        aborted = "trace-abort-0001"
        long_body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 500}
        with httpx.stream(
            "POST",
            f"{gateway.address}/v1/chat/completions",
            json={**long_body, "model": MODEL, "stream": True},
            headers={"X-Request-Id": aborted},
            timeout=30,
        ) as resp:
            assert resp.status_code == 200
            for _ in resp.iter_lines():
                break

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            replica_lines = json_lines(replica.log())
            gateway_lines = json_lines(gateway.log())
            ids_r = {line.get("request_id") for line in replica_lines}
            ids_g = {line.get("request_id") for line in gateway_lines}
            if {rid, aborted} <= ids_r and {rid, aborted} <= ids_g:
                break
            time.sleep(0.2)
    finally:
        if gateway is not None:
            gateway.stop()
        replica.stop()

    replica_log, gateway_log = replica.log(), gateway.log()
    replica_lines, gateway_lines = json_lines(replica_log), json_lines(gateway_log)
    # JSON format means every line is one JSON object.
    for name, raw, parsed in (
        ("replica", replica_log, replica_lines),
        ("gateway", gateway_log, gateway_lines),
    ):
        nonblank = [ln for ln in raw.splitlines() if ln.strip()]
        assert len(parsed) == len(nonblank), f"{name} log has non-JSON lines:\n{raw[-2000:]}"

    def about(lines: list[dict[str, object]], request_id: str) -> list[dict[str, object]]:
        return [ln for ln in lines if ln.get("request_id") == request_id]

    for request_id in (rid, aborted):
        assert about(gateway_lines, request_id), f"no gateway line for {request_id}:\n{gateway_log}"
        assert about(replica_lines, request_id), f"no replica line for {request_id}:\n{replica_log}"
    # Lines that name a request in their text also carry its id as a field.
    for lines in (gateway_lines, replica_lines):
        for line in lines:
            msg = str(line.get("msg", ""))
            for request_id in (rid, aborted):
                if request_id in msg:
                    assert str(line.get("request_id", "")).startswith(request_id), line
    assert any("aborted" in str(ln["msg"]) for ln in about(replica_lines, aborted))
    assert "zanzibar" not in gateway_log and "quokka" not in gateway_log
    assert "zanzibar" not in replica_log and "quokka" not in replica_log
