"""Locust users that stream chat completions and time what users feel.

Two kinds of user, equally many: one streams from `POST /v1/chat/<model>` (the
`{token, finished}` SSE format), the other from `POST /v1/chat/completions`
with `stream: true` (OpenAI chunks, usage in the last one). Each request is
recorded three ways, as its own locust entries:

- type `SSE`, name the route: the whole stream, from sending the request to
  its last event; the entry's content size is the number of output tokens;
- type `TTFT`, name `all routes`: time to the first token event;
- type `ITL`, name `all routes`: the gap between successive token events (one
  sample per token event after the first).

A request that is refused (4xx/5xx), ends with an error event or yields no
token is a failure of its `SSE` entry. Prompts mix short questions, a
paragraph and a long document (one in four each, the rest in between) so
prefill cost varies as in real traffic.

Options (locust command line, or environment): `--model` (MSS_MODEL, default
smollm2), `--max-tokens` (MSS_MAX_TOKENS, default 64), `--tokens-csv`
(MSS_TOKENS_CSV: write one line per second with the user count, requests and
output tokens finished in that second, for plots of tokens/s).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 50 -r 5 -t 60s
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import orjson
import requests
from locust import User, between, events, task
from locust.env import Environment

WORDS = (
    "serving large language models means batching requests, streaming tokens as soon as "
    "they are decoded, keeping the key value cache warm, routing each request to the "
    "replica with the most room, and telling users quickly when the system is full"
).split()
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about distributed systems.",
    "Explain continuous batching in two sentences.",
    "Give three tips for writing fast Python.",
    "Summarise what a load balancer does.",
    "What is a key-value cache in a transformer?",
]


def make_prompt(rng: random.Random) -> str:
    """A prompt of mixed length: a question, alone or after a context of 30 to 600 words."""
    roll = rng.random()
    if roll < 0.25:
        context_words = 0
    elif roll < 0.5:
        context_words = rng.randint(30, 80)
    elif roll < 0.75:
        context_words = rng.randint(80, 250)
    else:
        context_words = rng.randint(250, 600)
    question = rng.choice(QUESTIONS)
    if not context_words:
        return question
    start = rng.randrange(len(WORDS))
    context = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(context_words))
    return f"Read this text:\n{context}\n\n{question}"


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--model", default="smollm2", env_var="MSS_MODEL", help="model name")
    parser.add_argument(
        "--max-tokens", type=int, default=64, env_var="MSS_MAX_TOKENS", help="per request"
    )
    parser.add_argument(
        "--tokens-csv",
        default="",
        env_var="MSS_TOKENS_CSV",
        help="write users, requests and output tokens finished per second to this CSV",
    )


class Throughput:
    """Requests and output tokens finished, sampled once a second with the user count."""

    requests = 0
    tokens = 0

    @classmethod
    def record(cls, tokens: int) -> None:
        cls.requests += 1
        cls.tokens += tokens

    @classmethod
    def write_every_second(cls, environment: Environment, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as out:
            out.write("timestamp,users,requests_per_s,tokens_per_s\n")
            last_requests, last_tokens, last = cls.requests, cls.tokens, time.monotonic()
            while True:
                gevent.sleep(1.0)
                now = time.monotonic()
                span = max(now - last, 1e-6)
                runner = environment.runner
                users = runner.user_count if runner is not None else 0
                out.write(
                    f"{time.time():.3f},{users},{(cls.requests - last_requests) / span:.3f},"
                    f"{(cls.tokens - last_tokens) / span:.3f}\n"
                )
                out.flush()
                last_requests, last_tokens, last = cls.requests, cls.tokens, now


_sampler: list[gevent.Greenlet] = []


@events.test_start.add_listener
def _start_sampler(environment: Environment, **_: Any) -> None:
    path = getattr(environment.parsed_options, "tokens_csv", "") or ""
    if path and not _sampler:
        _sampler.append(gevent.spawn(Throughput.write_every_second, environment, Path(path)))


@events.test_stop.add_listener
def _stop_sampler(environment: Environment, **_: Any) -> None:
    while _sampler:
        _sampler.pop().kill()


class StreamError(Exception):
    """The stream ended with an error event or without any token."""


class ChatUser(User):
    """Base of the two streaming users: one request at a time over a kept-alive connection."""

    abstract = True
    wait_time = between(0.2, 1.0)
    route = ""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.session = requests.Session()
        options = environment.parsed_options
        self.model: str = getattr(options, "model", "smollm2")
        self.max_tokens: int = getattr(options, "max_tokens", 64)
        self.rng = random.Random()

    def on_stop(self) -> None:
        self.session.close()

    def request(self) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def parse(self, data: bytes) -> tuple[bool, int | None]:
        """(is a token event, output tokens when this is the final event)."""
        raise NotImplementedError

    def fire(self, kind: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=self.route if kind == "SSE" else "all routes",
            response_time=ms,
            response_length=length,
            exception=exc,
            context={},
        )

    @task
    def chat(self) -> None:
        url, body = self.request()
        started = time.perf_counter()
        last = 0.0
        token_events = 0
        output_tokens: int | None = None
        try:
            with self.session.post(
                f"{self.host}{url}",
                data=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
                stream=True,
                timeout=600,
            ) as resp:
                if resp.status_code != 200:
                    raise StreamError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                for line in lines(resp):
                    if line.startswith((b"event: error", b'data: {"error"')):
                        raise StreamError("error event in the stream")
                    if not line.startswith(b"data: "):
                        continue
                    is_token, final_tokens = self.parse(line[6:])
                    if final_tokens is not None:
                        output_tokens = final_tokens
                    if not is_token:
                        continue
                    now = time.perf_counter()
                    if token_events:
                        self.fire("ITL", (now - last) * 1000)
                    else:
                        self.fire("TTFT", (now - started) * 1000)
                    token_events += 1
                    last = now
            if not token_events:
                raise StreamError("no token in the stream")
        except (StreamError, requests.RequestException) as exc:
            self.fire("SSE", (time.perf_counter() - started) * 1000, 0, exc)
            return
        tokens = output_tokens if output_tokens is not None else token_events
        Throughput.record(tokens)
        self.fire("SSE", (time.perf_counter() - started) * 1000, tokens)


def lines(resp: requests.Response) -> Iterator[bytes]:
    """SSE lines as they arrive (each HTTP chunk is handed on at once, not buffered)."""
    pending = b""
    for chunk in resp.iter_content(chunk_size=None):
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line.rstrip(b"\r")
    if pending:
        yield pending


class SeedChatUser(ChatUser):
    """`POST /v1/chat/<model>` with JSON messages; events `{"token": ..., "finished": ...}`."""

    route = "/v1/chat/{model}"

    def request(self) -> tuple[str, dict[str, Any]]:
        body = {
            "messages": [{"role": "user", "content": make_prompt(self.rng)}],
            "max_tokens": self.max_tokens,
        }
        return f"/v1/chat/{self.model}", body

    def parse(self, data: bytes) -> tuple[bool, int | None]:
        if b'"finished":false' in data:
            return True, None
        event = orjson.loads(data)
        usage = event.get("usage") or {}
        return False, usage.get("completion_tokens")


class OpenAIChatUser(ChatUser):
    """`POST /v1/chat/completions`, streaming, with usage in the last chunk."""

    route = "/v1/chat/completions"

    def request(self) -> tuple[str, dict[str, Any]]:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": make_prompt(self.rng)}],
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return "/v1/chat/completions", body

    def parse(self, data: bytes) -> tuple[bool, int | None]:
        if data == b"[DONE]":
            return False, None
        if b'"delta":{"content":' in data:  # not the role chunk, nor the final ones
            return True, None
        chunk = orjson.loads(data)
        usage = chunk.get("usage") or {}
        return False, usage.get("completion_tokens")
