"""Benchmark of one replica alone: output tokens/s through gRPC against the engine in-process.

For each concurrency C, C closed-loop clients send requests of `--tokens`
output tokens (ignore_eos, so every request has the same length) back to back
for `--duration` seconds, and the output tokens/s are counted. Three ways to
reach the same engine, measured one after another in one run:

- `inprocess`: vLLM's AsyncLLM called directly in this process (the baseline);
- `grpc-mux`: a replica process, all requests multiplexed on one Generate stream;
- `grpc-per-request`: the same replica, one Generate stream per request.

    python -m loadtest.bench_replica                 # real engine, C = 1, 16, 64
    python -m loadtest.bench_replica --json out.jsonl --concurrency 1 16

`--stall` measures instead what long prompts cost the other streams of the
same replica: `--short-clients` closed-loop chat requests of `--short-tokens`
tokens stream on one Generate stream while bursts of long chat prompts arrive
on it (phases `quiet`, `long`, `oversized`; see PHASES). It reports the short
requests' time to first token and the gaps between their deltas, where a
replica busy tokenizing on its event loop shows as a stall.

    python -m loadtest.bench_replica --stall --engine fake --duration 10
    python -m loadtest.bench_replica --stall --engine vllm --duration 20

`--tokenizer-lag` isolates the cause in this process: how late a 1 ms ticker
on the event loop runs while long prompts are tokenized on the loop itself
versus on one worker thread (what `replica.engine.Engine.prepare` does).

Every script that starts an engine needs the __main__ guard (vLLM spawns
processes).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from mss.config import Deployment, EngineArgs
from mss.security import local_metadata
from protos import replica_pb2, replica_pb2_grpc
from replica.main import set_engine_environment

PROMPT = "Write a long story about a lighthouse keeper and the sea."

Runner = Callable[[int], Awaitable[int]]


@dataclass
class Point:
    mode: str
    concurrency: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


async def closed_loop(run_one: Runner, concurrency: int, duration: float) -> tuple[int, float]:
    """Run `concurrency` workers sending requests back to back; returns (tokens, seconds)."""
    stop_at = time.monotonic() + duration
    counter = iter(range(10**9))

    async def worker() -> int:
        produced = 0
        while time.monotonic() < stop_at:
            produced += await run_one(next(counter))
        return produced

    started = time.monotonic()
    totals = await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sum(totals), time.monotonic() - started


def grpc_request(i: int, tokens: int) -> replica_pb2.GenerateRequest:
    return replica_pb2.GenerateRequest(
        request_id=f"bench-{i}",
        prompt=PROMPT,
        sampling=replica_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True, seed=i),
    )


class MuxClient:
    """Many requests on one Generate stream, replies dispatched by request id.

    Each delta is stamped with the time its reply arrived, so callers can
    measure time to first token and the gaps between deltas.
    """

    def __init__(self, stub: replica_pb2_grpc.ReplicaStub) -> None:
        self.outgoing: asyncio.Queue[replica_pb2.GenerateClientMessage] = asyncio.Queue()
        self.waiters: dict[str, asyncio.Queue[tuple[float, replica_pb2.RequestDelta]]] = {}
        self.call = stub.Generate(self._messages(), metadata=local_metadata())
        self.reader = asyncio.create_task(self._read())

    async def _messages(self) -> AsyncIterator[replica_pb2.GenerateClientMessage]:
        while True:
            yield await self.outgoing.get()

    async def _read(self) -> None:
        async for reply in self.call:
            now = time.perf_counter()
            for delta in reply.deltas:
                queue = self.waiters.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait((now, delta))

    def send(self, *requests: replica_pb2.GenerateRequest) -> Timeline:
        """Send `requests` in one message (a batch when more than one); the first one's timeline."""
        timelines = self.send_all(*requests)
        return timelines[0]

    def send_all(self, *requests: replica_pb2.GenerateRequest) -> list[Timeline]:
        timelines = []
        for request in requests:
            queue: asyncio.Queue[tuple[float, replica_pb2.RequestDelta]] = asyncio.Queue()
            self.waiters[request.request_id] = queue
            timelines.append(Timeline(request.request_id, queue, time.perf_counter()))
        messages = [replica_pb2.GenerateClientMessage(request=r) for r in requests]
        if len(messages) == 1:
            self.outgoing.put_nowait(messages[0])
        else:
            batch = replica_pb2.RequestBatch(messages=messages)
            self.outgoing.put_nowait(replica_pb2.GenerateClientMessage(batch=batch))
        return timelines

    async def finish(self, timeline: Timeline) -> Timeline:
        """Wait for the request's last delta; fills in arrivals, tokens and error."""
        try:
            while True:
                arrived, delta = await timeline.queue.get()
                if delta.num_tokens:
                    timeline.arrivals.append(arrived)
                    timeline.tokens += delta.num_tokens
                if delta.finish_reason:
                    timeline.error_code = delta.error.code
                    timeline.error = delta.error.message
                    return timeline
        finally:
            del self.waiters[timeline.request_id]

    async def run(self, request: replica_pb2.GenerateRequest) -> int:
        timeline = await self.finish(self.send(request))
        if timeline.error_code:
            raise RuntimeError(timeline.error)
        return timeline.tokens

    def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()


@dataclass
class Timeline:
    """One request as its client saw it: when it was sent and when its tokens arrived."""

    request_id: str
    queue: asyncio.Queue[tuple[float, replica_pb2.RequestDelta]]
    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0
    error_code: int = 0
    error: str = ""


async def per_request(
    stub: replica_pb2_grpc.ReplicaStub, request: replica_pb2.GenerateRequest
) -> int:
    async def one() -> AsyncIterator[replica_pb2.GenerateClientMessage]:
        yield replica_pb2.GenerateClientMessage(request=request)

    tokens = 0
    async for reply in stub.Generate(one(), metadata=local_metadata()):
        for delta in reply.deltas:
            if delta.error.code:
                raise RuntimeError(delta.error.message)
            tokens += delta.num_tokens
    return tokens


async def bench_grpc(address: str, args: argparse.Namespace) -> list[Point]:
    points = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = replica_pb2_grpc.ReplicaStub(channel)
        mux = MuxClient(stub)
        await mux.run(grpc_request(-1, 8))  # warm-up
        for c in args.concurrency:
            tokens, secs = await closed_loop(
                lambda i: mux.run(grpc_request(i, args.tokens)), c, args.duration
            )
            points.append(Point("grpc-mux", c, tokens, secs))
            print(f"grpc-mux          C={c:<4} {tokens / secs:8.1f} tok/s", flush=True)
            tokens, secs = await closed_loop(
                lambda i: per_request(stub, grpc_request(i, args.tokens)), c, args.duration
            )
            points.append(Point("grpc-per-request", c, tokens, secs))
            print(f"grpc-per-request  C={c:<4} {tokens / secs:8.1f} tok/s", flush=True)
        mux.close()
    return points


async def bench_inprocess(args: argparse.Namespace) -> list[Point]:
    """The baseline: vLLM's own engine, no network in between."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from replica.vllm_engine import VllmEngine

    engine = VllmEngine(deployment(args))
    await engine.start()
    llm = engine.llm
    ids = engine.tokenizer.encode(PROMPT)

    async def run_one(i: int, tokens: int = args.tokens) -> int:
        params = SamplingParams(
            max_tokens=tokens, ignore_eos=True, seed=i, output_kind=RequestOutputKind.DELTA
        )
        produced = 0
        async for out in llm.generate({"prompt_token_ids": ids}, params, request_id=f"in-{i}"):
            produced += len(out.outputs[0].token_ids)
        return produced

    await run_one(-1, 8)
    points = []
    for c in args.concurrency:
        tokens, secs = await closed_loop(run_one, c, args.duration)
        points.append(Point("inprocess", c, tokens, secs))
        print(f"inprocess         C={c:<4} {tokens / secs:8.1f} tok/s", flush=True)
    await engine.shutdown()
    return points


# --- stall mode: short streams while long prompts arrive --------------------------------------

_VOCABULARY = (
    "the keeper climbed the lighthouse stairs every evening to light the lamp while storms "
    "rolled over the harbour and ships waited beyond the rocks for the tide to turn so that "
    "their sails could carry them home across the grey and restless northern sea"
).split()

PHASES = ("quiet", "long", "oversized")
"""`quiet`: short requests alone. `long`: long chat prompts arrive in bursts and are
served (one output token each). `oversized`: long chat prompts that the replica
tokenizes and then refuses for not fitting the context, so they cost the replica
its tokenization and nothing else."""


@dataclass
class StallPoint:
    engine: str
    phase: str
    short_requests: int
    long_requests: int
    long_refused: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    gap_p50_ms: float
    gap_p99_ms: float
    gap_max_ms: float


def pct(values: list[float], p: float) -> float:
    """The p-th percentile of `values` (linear interpolation); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def long_text(rng: random.Random, chars: int) -> str:
    """Plain words in random order: every prompt differs, so no prefix cache hides its prefill."""
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(_VOCABULARY)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def chat_request(request_id: str, content: str, max_tokens: int) -> replica_pb2.GenerateRequest:
    return replica_pb2.GenerateRequest(
        request_id=request_id,
        messages=[replica_pb2.ChatMessage(role="user", content=content)],
        sampling=replica_pb2.SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, temperature=0.0
        ),
    )


async def stall_phase(mux: MuxClient, phase: str, args: argparse.Namespace) -> StallPoint:
    """Short chat requests, closed loop, for `--duration` s; long prompts as `phase` says."""
    stop_at = time.perf_counter() + args.duration
    shorts: list[Timeline] = []
    longs: list[Timeline] = []

    async def short_client(worker: int) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            request = chat_request(
                f"{phase}-s{worker}-{i}", f"Tell me about the sea, please ({i}).", args.short_tokens
            )
            timeline = await mux.finish(mux.send(request))
            if timeline.error_code:
                raise RuntimeError(f"short request failed: {timeline.error}")
            shorts.append(timeline)
            i += 1

    async def long_prompts() -> None:
        rng = random.Random(7)
        chars = args.long_chars if phase == "long" else args.oversized_chars
        waiting: list[asyncio.Task[Timeline]] = []
        burst = 0
        while time.perf_counter() < stop_at:
            requests = [
                chat_request(f"{phase}-l{burst}-{j}", long_text(rng, chars), 1)
                for j in range(args.long_burst)
            ]
            waiting += [asyncio.create_task(mux.finish(t)) for t in mux.send_all(*requests)]
            burst += 1
            await asyncio.sleep(args.long_every_ms / 1000)
        longs.extend(await asyncio.gather(*waiting))

    tasks = [short_client(w) for w in range(args.short_clients)]
    if phase != "quiet":
        tasks.append(long_prompts())
    await asyncio.gather(*tasks)
    ttft = [(t.arrivals[0] - t.sent) * 1000 for t in shorts if t.arrivals]
    gaps = [(b - a) * 1000 for t in shorts for a, b in itertools.pairwise(t.arrivals)]
    refused = sum(1 for t in longs if t.error_code)
    if phase == "long" and refused:
        raise RuntimeError(f"{refused} long prompts refused: {longs[0].error}")
    return StallPoint(
        engine=args.engine,
        phase=phase,
        short_requests=len(shorts),
        long_requests=len(longs),
        long_refused=refused,
        ttft_p50_ms=pct(ttft, 50),
        ttft_p99_ms=pct(ttft, 99),
        gap_p50_ms=pct(gaps, 50),
        gap_p99_ms=pct(gaps, 99),
        gap_max_ms=max(gaps, default=float("nan")),
    )


async def bench_stall(address: str, args: argparse.Namespace) -> list[StallPoint]:
    points = []
    async with grpc.aio.insecure_channel(address) as channel:
        mux = MuxClient(replica_pb2_grpc.ReplicaStub(channel))
        # Warm-up: on CPU the engine's first batch of each size and its first
        # long prefill are slow; none of that belongs to the first phase.
        hello = [chat_request(f"warm-up-{i}", "Hello.", 4) for i in range(args.short_clients)]
        await asyncio.gather(*(mux.run(r) for r in hello))
        await mux.run(chat_request("warm-up-long", long_text(random.Random(1), args.long_chars), 1))
        for phase in args.phases:
            point = await stall_phase(mux, phase, args)
            points.append(point)
            print(
                f"{phase:<10} short {point.short_requests:5d}  long {point.long_requests:4d} "
                f"(refused {point.long_refused:4d})  TTFT p50 {point.ttft_p50_ms:7.1f} "
                f"p99 {point.ttft_p99_ms:7.1f} ms  gap p50 {point.gap_p50_ms:6.1f} "
                f"p99 {point.gap_p99_ms:6.1f} max {point.gap_max_ms:6.1f} ms",
                flush=True,
            )
        mux.close()
    return points


async def _ticks(stop: asyncio.Event) -> list[float]:
    """How late each 1 ms sleep on this loop wakes up, in ms, until `stop` is set."""
    late = []
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.001)
        late.append((time.perf_counter() - before) * 1000 - 1)
    return late


async def tokenizer_lag(args: argparse.Namespace) -> None:
    """Event-loop lag while long chat prompts are tokenized on the loop, then on one thread.

    The same two calls `VllmEngine` makes (chat template, then encode), with the
    bundled model's tokenizer; a ticker asks the loop for a turn every 1 ms, as
    the other streams of a replica would.
    """
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer

    from replica.model_store import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(deployment(args).model)))
    rng = random.Random(3)
    prompts = [long_text(rng, args.oversized_chars) for _ in range(30)]

    def tokenize(prompt: str) -> int:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False))

    tokens = tokenize(prompts[0])
    loop = asyncio.get_running_loop()
    thread = ThreadPoolExecutor(max_workers=1)
    for where in ("loop", "thread", "loop", "thread"):
        stop = asyncio.Event()
        ticker = asyncio.create_task(_ticks(stop))
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        for prompt in prompts:
            if where == "loop":
                tokenize(prompt)
                await asyncio.sleep(0)
            else:
                await loop.run_in_executor(thread, tokenize, prompt)
        elapsed = time.perf_counter() - started
        stop.set()
        late = await ticker
        print(
            f"{len(prompts)} prompts of {args.oversized_chars} chars ({tokens} tokens) "
            f"on the {where:<6}: {elapsed * 1000:5.0f} ms; 1 ms ticks late by "
            f"p50 {pct(late, 50):5.1f} p99 {pct(late, 99):5.1f} max {max(late):5.1f} ms",
            flush=True,
        )
    thread.shutdown()


def main_stall(args: argparse.Namespace) -> int:
    from tests.support import start_replica

    if args.engine == "fake":
        replica = start_replica(engine="fake", token_interval_ms=args.token_interval_ms)
    else:
        dep = deployment(args)
        replica = start_replica(
            engine="vllm", extra_args=["--deployment-json", dep.model_dump_json()]
        )
    try:
        points = asyncio.run(bench_stall(replica.address, args))
    finally:
        replica.stop()
    print(
        "\n| engine | phase | short reqs | long reqs | TTFT p50 ms | TTFT p99 ms "
        "| gap p50 ms | gap p99 ms | gap max ms |\n|---|---|---|---|---|---|---|---|---|"
    )
    for p in points:
        print(
            f"| {p.engine} | {p.phase} | {p.short_requests} | {p.long_requests} "
            f"| {p.ttft_p50_ms:.1f} | {p.ttft_p99_ms:.1f} | {p.gap_p50_ms:.1f} "
            f"| {p.gap_p99_ms:.1f} | {p.gap_max_ms:.1f} |"
        )
    if args.json:
        with open(args.json, "a") as out:
            for p in points:
                out.write(json.dumps({"mode": "stall", **p.__dict__}) + "\n")
    return 0


def deployment(args: argparse.Namespace) -> Deployment:
    return Deployment(engine="vllm", engine_args=EngineArgs(dtype=args.dtype))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per point")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", help="append one line per point to this file")
    parser.add_argument("--inprocess-only", action="store_true", help=argparse.SUPPRESS)
    stall = parser.add_argument_group("stall mode (--stall)")
    stall.add_argument(
        "--stall",
        action="store_true",
        help="short streams while long prompts arrive: TTFT and gaps between deltas",
    )
    stall.add_argument("--engine", choices=["fake", "vllm"], default="vllm")
    stall.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    stall.add_argument("--short-clients", type=int, default=8, help="closed-loop short streams")
    stall.add_argument("--short-tokens", type=int, default=32, help="output tokens per short one")
    stall.add_argument("--long-chars", type=int, default=5000, help="characters per long prompt")
    stall.add_argument(
        "--oversized-chars", type=int, default=16000, help="characters per oversized prompt"
    )
    stall.add_argument("--long-burst", type=int, default=4, help="long prompts per burst")
    stall.add_argument("--long-every-ms", type=float, default=500.0, help="time between bursts")
    stall.add_argument("--token-interval-ms", type=float, default=10.0, help="fake engine only")
    stall.add_argument(
        "--tokenizer-lag",
        action="store_true",
        help="in this process: loop lag while --oversized-chars prompts are tokenized",
    )
    args = parser.parse_args()
    # The in-process baseline builds its engine here: give this process the
    # environment a replica's entry point gives itself (replicas started below inherit it).
    set_engine_environment(deployment(args))

    if args.stall:
        return main_stall(args)
    if args.tokenizer_lag:
        asyncio.run(tokenizer_lag(args))
        return 0

    if args.inprocess_only:
        points = asyncio.run(bench_inprocess(args))
        print("POINTS " + json.dumps([p.__dict__ for p in points]))
        return 0

    # The baseline runs in a child process so its engine is gone before the
    # replica's starts: the two never compete for the cores.
    import subprocess

    child = subprocess.run(
        [sys.executable, "-m", "loadtest.bench_replica", "--inprocess-only", *sys.argv[1:]],
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in child.stdout.splitlines() if x.startswith("POINTS "))
    points = [Point(**p) for p in json.loads(line[7:])]
    for p in points:
        print(f"inprocess         C={p.concurrency:<4} {p.tokens_per_s:8.1f} tok/s", flush=True)

    from tests.support import start_replica

    dep = deployment(args)
    replica = start_replica(engine="vllm", extra_args=["--deployment-json", dep.model_dump_json()])
    try:
        points += asyncio.run(bench_grpc(replica.address, args))
    finally:
        replica.stop()

    base = {p.concurrency: p.tokens_per_s for p in points if p.mode == "inprocess"}
    print("\n| mode | C | tokens/s | ratio to in-process |\n|---|---|---|---|")
    for p in sorted(points, key=lambda p: (p.concurrency, p.mode)):
        ratio = p.tokens_per_s / base[p.concurrency]
        print(f"| {p.mode} | {p.concurrency} | {p.tokens_per_s:.1f} | {ratio:.3f} |")
    if args.json:
        with open(args.json, "a") as out:
            for p in points:
                out.write(json.dumps({**p.__dict__, "tokens_per_s": p.tokens_per_s}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
