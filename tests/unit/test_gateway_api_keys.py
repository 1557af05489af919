"""API keys: hashed entries in the config, the key store's lookup and reload, `mss keys`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import sys
from pathlib import Path

import pytest

from gateway import keys_cli
from gateway.api_keys import KEY_PREFIX, KeyStore, all_keys, hash_key, new_key
from gateway.errors import ApiError
from gateway.gateway import Gateway, GatewayOptions
from mss.config import ApiKey, ConfigError, GatewaySettings, parse_config

KEY_A = "mss-secret-a"
KEY_B = "mss-secret-b"


def entry(key_id: str, key: str, **limits: object) -> dict[str, object]:
    return {"id": key_id, "sha256": hash_key(key), **limits}


def settings(**fields: object) -> GatewaySettings:
    return GatewaySettings.model_validate(fields)


def write_keys(path: Path, *entries: dict[str, object]) -> None:
    """Write the keys file so that its signature changes even within one mtime tick."""
    path.write_text(json.dumps({"api_keys": list(entries)}))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_new_keys_are_random_256_bit_and_hashed_as_sha256_hex() -> None:
    key = new_key()
    assert key.startswith(KEY_PREFIX) and len(key) == len(KEY_PREFIX) + 43
    assert new_key() != key
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_plain_text_keys_are_refused_without_quoting_them() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("gateway: {api_keys: [hunter2-secret]}")
    message = str(err.value)
    assert "plain-text API keys are not accepted" in message
    assert "mss keys create --id NAME" in message and "mss keys hash" in message
    assert "hunter2" not in message


def test_key_entries_are_checked() -> None:
    with pytest.raises(ConfigError, match="String should match pattern"):
        parse_config("gateway: {api_keys: [{id: a, sha256: ABC}]}")
    with pytest.raises(ConfigError, match="'a' appears twice"):
        parse_config(f"gateway: {{api_keys: [{entry('a', KEY_A)}, {entry('a', KEY_B)}]}}")
    with pytest.raises(ConfigError, match="same hash"):
        parse_config(f"gateway: {{api_keys: [{entry('a', KEY_A)}, {entry('b', KEY_A)}]}}")
    with pytest.raises(ConfigError, match="burst 3 given without rps"):
        parse_config(f"gateway: {{api_keys: [{entry('a', KEY_A, burst=3)}]}}")
    config = parse_config(f"gateway: {{api_keys: [{entry('a', KEY_A, rps=2)}]}}")
    assert config.gateway.api_keys == [ApiKey(id="a", sha256=hash_key(KEY_A), rps=2)]


def test_lookup_finds_keys_in_force_by_their_hash_only() -> None:
    store = KeyStore(settings(api_keys=[entry("a", KEY_A), entry("b", KEY_B, max_streams=1)]))
    assert store.enabled
    found = store.lookup(KEY_B)
    assert found is not None and found.id == "b" and found.key.max_streams == 1
    assert store.lookup(KEY_A) is store.limiters["a"]
    for wrong in ("", KEY_A + " ", hash_key(KEY_A), "mss-secret"):
        assert store.lookup(wrong) is None
    assert not KeyStore(settings()).enabled


def test_a_bad_keys_file_refuses_the_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    with pytest.raises(ConfigError, match="cannot read keys file"):
        KeyStore(settings(api_keys_file=str(path)))
    path.write_text("api_keys: [{id: a}]")
    with pytest.raises(ConfigError, match=r"keys file .*: invalid:\n  api_keys.0.sha256: Field"):
        all_keys(settings(api_keys_file=str(path)))
    path.write_text("- not a mapping")
    with pytest.raises(ConfigError, match="expected a mapping"):
        all_keys(settings(api_keys_file=str(path)))
    write_keys(path, entry("a", KEY_B))
    with pytest.raises(ConfigError, match="'a' appears twice"):
        all_keys(settings(api_keys=[entry("a", KEY_A)], api_keys_file=str(path)))


def test_an_empty_keys_file_still_requires_a_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("")
    store = KeyStore(settings(api_keys_file=str(path)))
    assert store.enabled and not store.limiters


def test_the_keys_file_is_reloaded_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.yaml"
    write_keys(path, entry("b", KEY_B, rps=1, burst=1))
    store = KeyStore(settings(api_keys=[entry("a", KEY_A)], api_keys_file=str(path)))
    b = store.lookup(KEY_B)
    assert b is not None and b.admit() is None
    store.reload_if_changed()  # unchanged: nothing happens
    assert store.lookup(KEY_B) is b

    write_keys(path, entry("b", KEY_B, rps=1, burst=1, max_streams=5), entry("c", "mss-c"))
    with caplog.at_level(logging.INFO, "gateway"):
        store.reload_if_changed()
    assert "2 keys in force" not in caplog.text and "3 keys in force (added: c" in caplog.text
    assert store.lookup("mss-c") is not None
    assert store.lookup(KEY_B) is b and b.key.max_streams == 5  # usage kept: b's burst is taken
    assert b.admit() is not None

    write_keys(path, entry("c", "mss-c"))
    store.reload_if_changed()
    assert store.lookup(KEY_B) is None and store.lookup(KEY_A) is not None
    b.finish(3)  # a request of a removed key ends without harm

    caplog.clear()
    path.write_text("api_keys: [{id: d, sha256: nothex}]")
    with caplog.at_level(logging.INFO, "gateway"):
        store.reload_if_changed()
    assert "api_keys.0.sha256" in caplog.text and "previous keys stay in force" in caplog.text
    assert store.lookup("mss-c") is not None
    caplog.clear()
    with caplog.at_level(logging.INFO, "gateway"):
        store.reload_if_changed()  # the same bad file is reported once
    assert not caplog.text

    path.unlink()
    store.reload_if_changed()
    assert store.lookup("mss-c") is not None


async def test_the_watcher_reloads_off_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    write_keys(path, entry("a", KEY_A))
    store = KeyStore(settings(api_keys_file=str(path)))
    watcher = asyncio.create_task(store.watch(interval=0.01))
    try:
        write_keys(path, entry("b", KEY_B))
        deadline = asyncio.get_running_loop().time() + 5
        while store.lookup(KEY_B) is None:
            assert asyncio.get_running_loop().time() < deadline, "the file was not reloaded"
            await asyncio.sleep(0.01)
        assert store.lookup(KEY_A) is None
    finally:
        watcher.cancel()


def auth_headers(authorization: str | None) -> dict[str, str]:
    return {} if authorization is None else {"authorization": authorization}


def test_check_auth_answers_401_for_a_missing_or_wrong_key() -> None:
    gateway = Gateway(GatewayOptions())
    assert gateway.check_auth(auth_headers(None)) is None
    config = parse_config(f"gateway: {{api_keys: [{entry('a', KEY_A)}]}}")
    gateway = Gateway(GatewayOptions(config=config))
    found = gateway.check_auth(auth_headers(f"Bearer {KEY_A}"))
    assert found is not None and found.id == "a"
    assert gateway.check_auth(auth_headers(f"bearer  {KEY_A} ")) is found
    for header in (None, KEY_A, f"Basic {KEY_A}", "Bearer wrong", "Bearer "):
        with pytest.raises(ApiError) as err:
            gateway.check_auth(auth_headers(header))
        assert err.value.status == 401 and err.value.code == "invalid_api_key"


def run_cli(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    keys_cli.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            code = keys_cli.run(parser.parse_args(argv))
        finally:
            sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def test_keys_create_prints_the_key_once_and_an_entry_the_config_accepts() -> None:
    argv = ["create", "--id", "team-a", "--rps", "5", "--tokens-per-minute", "20000"]
    code, out, err = run_cli([*argv, "--max-streams", "4"])
    assert code == 0 and "shown only now" in err
    key, comment, item = out.splitlines()
    assert key.startswith(KEY_PREFIX) and comment.startswith("#") and key not in item
    config = parse_config(f"gateway:\n  api_keys:\n  {item}\n")
    (stored,) = config.gateway.api_keys
    assert stored == ApiKey(
        id="team-a", sha256=hash_key(key), rps=5, tokens_per_minute=20000, max_streams=4
    )
    assert KeyStore(config.gateway).lookup(key) is not None


def test_keys_hash_turns_an_existing_key_into_an_entry() -> None:
    code, out, _ = run_cli(["hash", "--id", "123"], stdin="old-plain-key\n")
    assert code == 0 and "old-plain-key" not in out
    item = out.splitlines()[-1]
    (stored,) = parse_config(f"gateway:\n  api_keys:\n  {item}\n").gateway.api_keys
    assert stored.id == "123" and stored.sha256 == hash_key("old-plain-key")
    assert run_cli(["hash", "--id", "x"], stdin="")[0] == 2
    code, _, err = run_cli(["create", "--id", "bad id"])
    assert code == 2 and "id: String should match pattern" in err
