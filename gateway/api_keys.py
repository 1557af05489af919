"""API keys: stored as SHA-256 hashes, looked up by digest, reloaded from a keys file.

Keys come from `gateway.api_keys` in the config and from `gateway.api_keys_file`
(`{api_keys: [...]}`, the same entries). The file is read at start, where a bad
one refuses the start, and again whenever its size, mtime or inode changes
(polled once a second, read off the event loop); a bad file then is logged and
the keys in force stay. Each key has a `KeyLimiter` (`gateway/rate_limits.py`)
that lives as long as its id, so a reload keeps what the key has used.

SHA-256 and no slow KDF: keys are random 256-bit secrets made by `new_key`, not
passwords, so a stolen hash cannot be guessed back, however fast the hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from gateway import metrics
from gateway.errors import ApiError
from gateway.rate_limits import Clock, KeyLimiter
from mss.config import (
    ApiKey,
    ApiKeys,
    ConfigError,
    GatewaySettings,
    StrictModel,
    check_unique_keys,
    format_validation_error,
)

log = logging.getLogger("gateway")

KEY_PREFIX = "mss-"
"""New keys start with it, so a leaked one is recognisable (secret scanners)."""
RELOAD_INTERVAL_S = 1.0

FileSignature = tuple[int, int, int]
"""(inode, size, mtime in ns) of the keys file: a change in any means it is read again."""


def new_key() -> str:
    """A fresh random key: 256 bits from the OS's CSPRNG, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key: its SHA-256 as hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeysFile(StrictModel):
    """The keys file."""

    api_keys: ApiKeys = Field(default_factory=list)


def read_keys_file(path: str) -> list[ApiKey]:
    """The keys in the file at `path`; raises ConfigError saying what is wrong with it."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read keys file {path!r}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"keys file {path}: not valid YAML or JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"keys file {path}: expected a mapping `api_keys: [...]`")
    try:
        return KeysFile.model_validate(raw).api_keys
    except ValidationError as exc:
        raise ConfigError(f"keys file {path}: invalid:\n{format_validation_error(exc)}") from exc


def all_keys(settings: GatewaySettings, file_keys: list[ApiKey] | None = None) -> list[ApiKey]:
    """The config's keys and the keys file's (read now unless given); ids and hashes unique.

    Raises ConfigError; `gateway.main` calls it before starting so a bad file refuses the start.
    """
    if file_keys is None:
        file_keys = read_keys_file(settings.api_keys_file) if settings.api_keys_file else []
    try:
        return check_unique_keys([*settings.api_keys, *file_keys])
    except ValueError as exc:
        raise ConfigError(f"gateway.api_keys and {settings.api_keys_file}: {exc}") from exc


def _signature(path: str) -> FileSignature | None:
    try:
        st = os.stat(os.path.expanduser(path))
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class KeyStore:
    """The keys in force at this gateway process, by digest, with their limiters."""

    def __init__(self, settings: GatewaySettings, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.path = settings.api_keys_file
        self.enabled = bool(settings.api_keys) or self.path is not None
        """False when no key is configured: requests need none."""
        self.limiters: dict[str, KeyLimiter] = {}
        """By key id."""
        self._by_digest: dict[str, KeyLimiter] = {}
        self._signature = _signature(self.path) if self.path else None
        self._install(all_keys(settings))

    def _install(self, keys: list[ApiKey]) -> None:
        limiters: dict[str, KeyLimiter] = {}
        for key in keys:
            limiter = self.limiters.get(key.id)
            if limiter is None:
                limiter = KeyLimiter(key, self.clock)
            else:
                limiter.configure(key)
            limiters[key.id] = limiter
        self.limiters = limiters
        self._by_digest = {limiter.key.sha256: limiter for limiter in limiters.values()}

    def lookup(self, presented: str) -> KeyLimiter | None:
        """The limiter of the key `presented`, or None when it is not a key in force.

        Looked up by digest: timing can tell at most how the digest of the
        presented key compares to stored digests, which says nothing usable
        about a stored key; the final comparison is constant-time anyway.
        """
        digest = hash_key(presented)
        limiter = self._by_digest.get(digest)
        if limiter is None or not hmac.compare_digest(limiter.key.sha256, digest):
            return None
        return limiter

    def _read_if_changed(self) -> list[ApiKey] | None:
        """The keys (config and file) when the file changed since last read, else None.

        Runs on a worker thread: it touches only the file and its own signature.
        Raises ConfigError when the changed file is bad.
        """
        assert self.path is not None
        signature = _signature(self.path)
        if signature == self._signature:
            return None
        self._signature = signature  # a bad version is reported once, not every second
        return all_keys(self.settings)

    def _apply(self, keys: list[ApiKey] | None) -> None:
        if keys is None:
            return
        before = set(self.limiters)
        self._install(keys)
        after = set(self.limiters)
        log.info(
            "keys file %s reloaded: %d keys in force (added: %s; removed: %s)",
            self.path,
            len(after),
            ", ".join(sorted(after - before)) or "none",
            ", ".join(sorted(before - after)) or "none",
        )

    def reload_if_changed(self) -> None:
        """Read the keys file again if it changed; a bad file is logged and changes nothing."""
        if self.path is None:
            return
        try:
            self._apply(self._read_if_changed())
        except ConfigError as exc:
            log.error("%s; the previous keys stay in force", exc)

    async def watch(self, interval: float = RELOAD_INTERVAL_S) -> None:
        """Reload the keys file within `interval` of each change, until cancelled."""
        if self.path is None:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                keys = await asyncio.to_thread(self._read_if_changed)
            except ConfigError as exc:
                log.error("%s; the previous keys stay in force", exc)
                continue
            self._apply(keys)


def admit(limiter: KeyLimiter) -> list[tuple[bytes, bytes]]:
    """Count a request under its key: its `x-ratelimit-*` headers, or a 429 ApiError with them."""
    refusal = limiter.admit()
    key_metrics = metrics.for_key(limiter.id)
    if refusal is None:
        key_metrics.requests.inc()
        return limiter.headers()
    key_metrics.rejections[refusal.kind].inc()
    raise ApiError(
        429,
        refusal.message,
        code=f"key_{refusal.kind}_limit",
        retry_after=refusal.retry_after,
        headers=limiter.headers(),
    )


def finish(limiter: KeyLimiter, output_tokens: int) -> None:
    """An admitted request ended: charge its output tokens to its key."""
    limiter.finish(output_tokens)
    metrics.for_key(limiter.id).output_tokens.inc(output_tokens)
