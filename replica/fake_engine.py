"""A deterministic stand-in for vLLM: words at a fixed interval, a word per token.

For fast tests of the gateway and control plane and for load tests of the
serving path; never the proof that serving works. The text a request gets
depends only on its prompt, so tests can compare runs.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from mss.config import Deployment
from replica.engine import Delta, Engine, EngineLoad, Messages, Prepared

_WORDS = (
    "the quick brown fox jumps over a lazy dog while streams of tokens flow "
    "through gateways replicas and schedulers under load"
).split()


class FakeEngine(Engine):
    """Deterministic words every `token_interval_ms`.

    All requests advance on one shared clock, as in a batching engine: each
    tick emits one token for every running request, so one tick is one engine
    step and the server can send it as one message.
    """

    def __init__(self, deployment: Deployment) -> None:
        super().__init__(deployment)
        self._load = EngineLoad()
        self._active: dict[str, asyncio.Queue[Delta | None]] = {}
        self._states: dict[str, _FakeState] = {}
        self._clock: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def load(self) -> EngineLoad:
        return self._load

    async def start(self) -> None:
        delay = self.deployment.engine_args.load_delay_s
        if delay:
            await asyncio.sleep(delay)
        self._clock = asyncio.create_task(self._tick_loop(), name="fake-engine-clock")

    def _tokenize(self, messages: Messages, prompt: str) -> tuple[str, list[int]]:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) or prompt
        return text, [len(word) for word in text.split()]

    async def _stream(self, prepared: Prepared) -> AsyncGenerator[Delta, None]:
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
            self._forget(prepared.request_id)

    async def abort(self, request_id: str) -> None:
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        self._states.pop(request_id, None)
        self._load.running = len(self._active)

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
            self._load.running = len(self._active)
            self._load.kv_cache_usage = min(1.0, len(self._active) / 1024)

    async def running_requests(self) -> int:
        return len(self._active)

    async def shutdown(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            await asyncio.gather(self._clock, return_exceptions=True)
        await super().shutdown()


@dataclass(slots=True)
class _FakeState:
    """One request's place in the word list and what it has produced so far."""

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
