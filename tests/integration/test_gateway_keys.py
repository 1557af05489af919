"""API keys through real processes: hashed keys, per-key limits, the keys file reloaded.

A fake-engine replica behind `mss gateway` whose keys come from the config and
from a keys file; each test uses its own keys, so their limits do not meet.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.api_keys import hash_key
from tests.support import FAKE_MODEL, Proc, spawn, start_gateway, start_replica, write_config

MODEL = FAKE_MODEL
STATIC_KEY = "mss-static-key"
Limits = dict[str, float]
KEYS: dict[str, tuple[str, Limits]] = {
    "rps": ("mss-rps-key", {"rps": 0.2, "burst": 2}),
    "streams": ("mss-streams-key", {"max_streams": 1}),
    "tokens": ("mss-tokens-key", {"tokens_per_minute": 10}),
    "old": ("mss-old-key", {}),
}
"""id: (key, limits) of the keys file."""
NEW_KEY = "mss-new-key"


def entry(key_id: str, key: str, limits: Limits) -> dict[str, object]:
    return {"id": key_id, "sha256": hash_key(key), **limits}


def write_keys(path: Path, keys: dict[str, tuple[str, Limits]]) -> None:
    entries = [entry(key_id, key, limits) for key_id, (key, limits) in keys.items()]
    path.write_text(json.dumps({"api_keys": entries}))


@pytest.fixture(scope="module")
def keys_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mss-keys-") as folder:
        path = Path(folder) / "keys.json"
        write_keys(path, KEYS)
        yield path


@pytest.fixture(scope="module")
def gateway(keys_file: Path) -> Iterator[Proc]:
    config = f"""
gateway:
  api_keys: [{json.dumps(entry("static", STATIC_KEY, {}))}]
  api_keys_file: {keys_file}
deployments:
  - name: {MODEL}
    engine: fake
    model: fake
    limits: {{max_tokens: 64}}
"""
    replica = start_replica(token_interval_ms=30)
    proc = None
    try:
        proc = start_gateway([(MODEL, replica.address)], config=config)
        yield proc
    finally:
        if proc is not None:
            proc.stop()
        replica.stop()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def ask(url: str, key: str | None, max_tokens: int = 2) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": max_tokens},
        headers=bearer(key) if key else {},
        timeout=30,
    )


def metric(gateway: Proc, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{gateway.address}/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_missing_or_wrong_key_is_401_on_every_api_route(gateway: Proc) -> None:
    url = gateway.address
    for key in (None, "mss-wrong-key", hash_key(STATIC_KEY)):
        r = ask(url, key)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "AuthenticationError"
        headers = bearer(key) if key else {}
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
    assert ask(url, STATIC_KEY).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers=bearer(STATIC_KEY)).status_code == 200
    r = httpx.post(f"{url}/tokenize", json={"prompt": "hi"}, headers=bearer(KEYS["old"][0]))
    assert r.status_code == 200, r.text
    assert httpx.get(f"{url}/ready").status_code == 200  # service routes need no key


def test_a_key_past_its_requests_per_second_gets_429_with_headers(gateway: Proc) -> None:
    key = KEYS["rps"][0]
    first, second = ask(gateway.address, key), ask(gateway.address, key)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-tokens" not in first.headers  # a limit the key does not have
    refused = ask(gateway.address, key)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "RateLimitError"
    assert 1 <= int(refused.headers["retry-after"]) <= 5
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert metric(gateway, "mss_gateway_key_rejections_total", key="rps", limit="requests") == 1
    assert metric(gateway, "mss_gateway_key_requests_total", key="rps") == 2


async def test_a_key_past_its_concurrent_streams_gets_429(gateway: Proc) -> None:
    key = KEYS["streams"][0]
    body = {"model": MODEL, "prompt": "long", "max_tokens": 30, "stream": True}
    async with httpx.AsyncClient(base_url=gateway.address, timeout=30) as client:
        async with client.stream(
            "POST", "/v1/completions", json=body, headers=bearer(key)
        ) as running:
            assert running.status_code == 200
            chunks = running.aiter_bytes()
            await anext(chunks)  # the stream has begun
            refused = await client.post("/v1/completions", json=body, headers=bearer(key))
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "1"
            assert "requests in progress" in refused.json()["error"]["message"]
            async for _ in chunks:
                pass
        again = await client.post(
            "/v1/completions", json={**body, "stream": False}, headers=bearer(key)
        )
        assert again.status_code == 200, again.text
    assert metric(gateway, "mss_gateway_key_rejections_total", key="streams", limit="streams") == 1


def test_output_tokens_are_charged_and_an_exhausted_budget_gets_429(gateway: Proc) -> None:
    key = KEYS["tokens"][0]
    first = ask(gateway.address, key, max_tokens=12)
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 12
    assert first.headers["x-ratelimit-limit-tokens"] == "10"
    assert first.headers["x-ratelimit-remaining-tokens"] == "10"  # charged at the end
    refused = ask(gateway.address, key)
    assert refused.status_code == 429, refused.text
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert "10 output tokens per minute" in refused.json()["error"]["message"]
    assert metric(gateway, "mss_gateway_key_output_tokens_total", key="tokens") == 12
    assert metric(gateway, "mss_gateway_key_rejections_total", key="tokens", limit="tokens") == 1


def test_an_edited_keys_file_takes_effect_and_a_bad_one_changes_nothing(
    gateway: Proc, keys_file: Path
) -> None:
    old = KEYS["old"][0]
    assert ask(gateway.address, old).status_code == 200
    assert ask(gateway.address, NEW_KEY).status_code == 401
    keys = {k: v for k, v in KEYS.items() if k != "old"}
    write_keys(keys_file, {**keys, "new": (NEW_KEY, {})})
    deadline = time.monotonic() + 10
    while ask(gateway.address, NEW_KEY).status_code != 200:
        assert time.monotonic() < deadline, "the new key was not taken up"
        time.sleep(0.2)
    assert ask(gateway.address, old).status_code == 401
    assert "keys file" in gateway.log() and "removed: old" in gateway.log()

    keys_file.write_text("api_keys: [{id: broken}]")
    deadline = time.monotonic() + 10
    while "previous keys stay in force" not in gateway.log():
        assert time.monotonic() < deadline, "the bad file was not reported"
        time.sleep(0.2)
    assert ask(gateway.address, NEW_KEY).status_code == 200
    assert ask(gateway.address, STATIC_KEY).status_code == 200


def test_metrics_name_keys_by_id_only(gateway: Proc) -> None:
    text = httpx.get(f"{gateway.address}/metrics").text
    assert metric(gateway, "mss_gateway_key_requests_total", key="static") >= 1
    assert metric(gateway, "mss_gateway_rejections_total", reason="auth") >= 1
    for secret in (STATIC_KEY, NEW_KEY, "mss-wrong-key", *(key for key, _ in KEYS.values())):
        assert secret not in text
        assert hash_key(secret) not in text


def test_a_bad_keys_file_refuses_the_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("api_keys: [plain-text-secret]")
    config = write_config(f"gateway: {{api_keys_file: {path}}}\n")
    proc = spawn(["gateway", "--port", "0", "--config", config], "gateway-bad-keys")
    try:
        assert proc.proc.wait(30) == 2
    finally:
        proc.stop()
    assert "plain-text API keys are not accepted" in proc.log()
    assert "plain-text-secret" not in proc.log()
