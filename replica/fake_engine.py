"""A deterministic stand-in for vLLM: words at a fixed interval, a word per token.

For fast tests of the gateway and control plane and for load tests of the
serving path; never the proof that serving works. What a request gets
depends only on its prompt and its sampling message, so tests can compare
runs and check exact shapes:

- Vocabulary: `VOCAB_SIZE` ids; id `k * 20 + j` is the word `_WORDS[j]`,
  followed by the number k when k > 0 ("fox", "fox1", "fox2"...). Tokenize
  splits on whitespace, one id per word: a vocabulary word gets its id, any
  other word a hashed id (so Detokenize gives back vocabulary words only).
  Rendered chat is one line per message, `role: content`.
- Text: choice 0 walks the word list from a place set by the prompt's hash
  (plus the seed, when given); choice i uses the same walk with i folded
  into every word ("of1 tokens1 ..."), so choices are distinct. A migrated
  request (`resume`) walks on from where its output stopped, so its text
  is exactly the rest of an uninterrupted run's. Sampling
  values (temperature, penalties, logit_bias...) are validated but do not
  change the words.
- Stops as vLLM does: stop strings (checked once min_tokens are out, cut from
  the text unless include_stop_str_in_output, with a held-back tail so a stop
  string never leaks), stop_token_ids (the token counts, its text does not),
  max_tokens ("length").
- Logprobs: the chosen token is always the most likely: logprob
  -0.1 * (1 + position % 4), alternatives the next ids at one less each, in
  vLLM's order (chosen first, then the rest: max(k, 1) entries for k asked).
  Prompt logprobs the same, the first prompt token without one.
- Structured outputs: a fixed minimal text (`replica.fake_structured`),
  streamed in pieces, finishing with "stop"; regex and grammar are refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from mss.config import Deployment
from protos import replica_pb2
from replica.engine import Delta, Engine, EngineDead, EngineLoad, Prepared, PromptSource
from replica.fake_structured import structured_text
from replica.sampling import Limits

_WORDS = (
    "the quick brown fox jumps over a lazy dog while streams of tokens flow "
    "through gateways replicas and schedulers under load"
).split()
_WORD_IDS = {word: j for j, word in enumerate(_WORDS)}
_WORD_RE = re.compile(r"([a-z]+?)([1-9][0-9]*)?")
_PIECE_RE = re.compile(r"\s*(?:\w+|[^\w\s])")

VOCAB_SIZE = 32_000
MAX_LOGPROBS = 20


def word_for(token_id: int) -> str:
    """The fake vocabulary's word for an id."""
    k, j = divmod(token_id, len(_WORDS))
    return _WORDS[j] + (str(k) if k else "")


def id_for(word: str) -> int:
    """The fake vocabulary's id for a word: its own for vocabulary words, else a hash."""
    match = _WORD_RE.fullmatch(word)
    if match and match.group(1) in _WORD_IDS:
        token_id = int(match.group(2) or 0) * len(_WORDS) + _WORD_IDS[match.group(1)]
        if token_id < VOCAB_SIZE:
            return token_id
    return _hash(word) % VOCAB_SIZE


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


class FakeEngine(Engine):
    """Deterministic words every `token_interval_ms`.

    All requests advance on one shared clock, as in a batching engine: each
    tick emits one token for every running choice of every request, so one
    tick is one engine step and the server can send it as one message.
    """

    def __init__(self, deployment: Deployment) -> None:
        super().__init__(deployment)
        self._load = EngineLoad()
        self._limits = Limits(
            vocab_size=VOCAB_SIZE,
            max_model_len=self.max_model_len,
            max_logprobs=MAX_LOGPROBS,
            max_n=deployment.engine_args.max_num_seqs,
        )
        self._active: dict[str, _FakeRequest] = {}
        self._clock: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def load(self) -> EngineLoad:
        return self._load

    @property
    def limits(self) -> Limits:
        return self._limits

    async def start(self) -> None:
        delay = self.deployment.engine_args.load_delay_s
        if delay:
            await asyncio.sleep(delay)
        if self.deployment.engine_args.load_error:
            raise RuntimeError(self.deployment.engine_args.load_error)
        self._clock = asyncio.create_task(self._tick_loop(), name="fake-engine-clock")

    # ----- tokenizer ---------------------------------------------------------------------

    def _tokenize(self, source: PromptSource) -> tuple[str, list[int]]:
        if source.prompt_token_ids:
            return self._detokenize(source.prompt_token_ids), list(source.prompt_token_ids)
        text = (
            "\n".join(f"{m['role']}: {m['content'] or ''}" for m in source.messages)
            or source.prompt
        )
        return text, [id_for(word) for word in text.split()]

    def _token_strs(self, ids: list[int]) -> list[str]:
        return [word_for(i) for i in ids]

    def _detokenize(self, ids: list[int]) -> str:
        return " ".join(word_for(i) for i in ids)

    def _engine_params(self, prepared: Prepared) -> list[tuple[str, int]] | None:
        """The structured text's pieces and ids, when a constraint is asked; else None."""
        structured = prepared.sampling.structured
        if structured is None:
            return None
        text = structured_text(structured)
        pieces = _PIECE_RE.findall(text) or [text]
        return [(piece, _hash(piece) % VOCAB_SIZE) for piece in pieces]

    # ----- streaming ---------------------------------------------------------------------

    async def _stream(self, prepared: Prepared) -> AsyncGenerator[Delta, None]:
        request = _FakeRequest(prepared, _hash(prepared.prompt_text))
        self._active[prepared.request_id] = request
        self._wake.set()
        try:
            while True:
                deltas = await request.queue.get()
                for delta in deltas:
                    yield delta
                    if delta.last:
                        return
        finally:
            self._forget(prepared.request_id)

    async def stream_to(self, prepared: Prepared, push: Callable[[Delta], None]) -> None:
        """Each step's deltas go to `push` from the clock itself: the caller waits once, for
        the request's end, not once per step. A migrated request takes `generate`'s path
        (it reshapes the first and last deltas)."""
        if prepared.resumed:
            await super().stream_to(prepared, push)
            return
        if self.dead.is_set():
            raise EngineDead(f"engine died: {self.death}")
        request = _FakeRequest(prepared, _hash(prepared.prompt_text))
        request.push = push
        request.finished = asyncio.get_running_loop().create_future()
        self._active[prepared.request_id] = request
        self._wake.set()
        try:
            await request.finished
        except asyncio.CancelledError:
            await self.abort(prepared.request_id)
            raise
        finally:
            self._forget(prepared.request_id)

    async def abort(self, request_id: str) -> None:
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._active.pop(request_id, None)
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
            for request in list(self._active.values()):
                if request.done:
                    continue
                push = request.push
                if push is None:
                    request.queue.put_nowait(request.step())
                    continue
                finished = request.finished
                if finished is None or finished.done():  # its caller left
                    continue
                try:
                    for delta in request.step():
                        push(delta)
                except Exception as exc:  # the caller's failure, not the clock's
                    request.done = True
                    finished.set_exception(exc)
                    continue
                if request.done:
                    finished.set_result(None)
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
class _FakeRequest:
    """One request: its choices, and the queue its steps go to."""

    prepared: Prepared
    offset: int
    queue: asyncio.Queue[list[Delta]] = field(default_factory=asyncio.Queue)
    """Where each step goes for `generate`; unused when `push` is set."""
    push: Callable[[Delta], None] | None = None
    """Where each delta goes for `stream_to`."""
    finished: asyncio.Future[None] | None = None
    """Done once the last step was pushed (`stream_to`)."""
    choices: list[_FakeChoice] = field(default_factory=list)
    running: int = 0
    """Choices not finished."""
    started: bool = False
    done: bool = False

    def __post_init__(self) -> None:
        sampling = self.prepared.sampling
        offset = self.offset + (sampling.seed or 0)
        pieces: list[tuple[str, int]] | None = self.prepared.engine_params
        start = self.prepared.resumed  # a migrated request walks on from where it stopped
        self.choices = [
            _FakeChoice(self.prepared, i, offset, pieces, start) for i in range(sampling.n)
        ]
        self.running = len(self.choices)

    def step(self) -> list[Delta]:
        """One engine step: a delta for every choice still running."""
        deltas = []
        for choice in self.choices:
            if not choice.finished:
                deltas.append(choice.step())
                if choice.finished:
                    self.running -= 1
        if not self.started:
            self.started = True
            first = deltas[0]  # choice 0 is still running at the first step
            first.prompt_token_ids = self.prepared.prompt_token_ids
            if self.prepared.sampling.prompt_logprobs is not None:
                first.prompt_logprobs = _prompt_logprobs(
                    self.prepared.prompt_token_ids, self.prepared.sampling.prompt_logprobs
                )
        if not self.running:
            self.done = True
            last = deltas[-1]
            last.last = True
            last.prompt_tokens = len(self.prepared.prompt_token_ids)
            last.completion_tokens = sum(c.produced for c in self.choices)
        return deltas


@dataclass(slots=True)
class _FakeChoice:
    """One choice's place in the word list (or the structured text) and its text so far."""

    prepared: Prepared
    index: int
    offset: int
    pieces: list[tuple[str, int]] | None
    start: int = 0
    """Tokens produced before this request (a migrated request continues the walk)."""
    produced: int = 0
    text: str = ""
    sent: int = 0
    finished: bool = False

    def step(self) -> Delta:
        sampling = self.prepared.sampling
        token, token_id = self._next_token()
        self.produced += 1
        finish: str | None = None
        stop_reason = ""
        counts_text = True
        if self.pieces is not None and self.produced >= len(self.pieces):
            finish = "stop"  # the structured text is complete: the model's end of sequence
        if token_id in sampling.stop_token_ids and self.produced > sampling.min_tokens:
            finish, stop_reason = "stop", str(token_id)
            counts_text = sampling.include_stop_str_in_output
        if counts_text:
            self.text += token
        if sampling.stop and self.produced > sampling.min_tokens and not stop_reason:
            stop = _find_stop(self.text, len(token), sampling.stop)
            if stop is not None:
                at, stop_str = stop
                end = at + len(stop_str) if sampling.include_stop_str_in_output else at
                self.text = self.text[:end]
                finish, stop_reason = "stop", stop_str
        if finish is None and self.produced >= sampling.max_tokens:
            finish = "length"
        held = 0
        if finish is None and sampling.stop and not sampling.include_stop_str_in_output:
            held = max(len(s) for s in sampling.stop) - 1
        upto = max(self.sent, len(self.text) - held)
        delta = Delta(
            text=self.text[self.sent : upto], num_tokens=1, index=self.index, token_ids=[token_id]
        )
        self.sent = upto
        if sampling.logprobs is not None:
            delta.logprobs = [_logprob(token_id, token, self.produced - 1, sampling.logprobs)]
        if finish is not None:
            self.finished = True
            delta.finish_reason = finish
            delta.stop_reason = stop_reason
        return delta

    def _next_token(self) -> tuple[str, int]:
        if self.pieces is not None:
            return self.pieces[self.produced]
        position = self.start + self.produced
        j = (self.offset + position) % len(_WORDS)
        token_id = self.index * len(_WORDS) + j
        word = word_for(token_id)
        return (word if position == 0 else " " + word), token_id


def _find_stop(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """The first stop string (in the request's order) in the text's new tail, as vLLM
    checks them (`check_stop_strings`)."""
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1:
            return at, stop
    return None


def _logprob(token_id: int, token: str, position: int, top: int) -> replica_pb2.TokenLogprob:
    value = -0.1 * (1 + position % 4)
    entry = replica_pb2.TokenLogprob(
        token_id=token_id, token=token, logprob=value, has_logprob=True, rank=1
    )
    entry.top.add(token_id=token_id, token=token, logprob=value, rank=1)
    for a in range(1, top):
        alt = (token_id + a) % VOCAB_SIZE
        entry.top.add(token_id=alt, token=" " + word_for(alt), logprob=value - a, rank=a + 1)
    return entry


def _prompt_logprobs(ids: list[int], top: int) -> list[replica_pb2.TokenLogprob]:
    out = [replica_pb2.TokenLogprob(token_id=ids[0], token=word_for(ids[0]))]
    out.extend(_logprob(i, " " + word_for(i), p, top) for p, i in enumerate(ids[1:]))
    return out
