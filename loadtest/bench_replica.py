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

Every script that starts an engine needs the __main__ guard (vLLM spawns
processes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from mss.config import Deployment, EngineArgs
from protos import replica_pb2, replica_pb2_grpc

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
        request_id=f"bench-{i}", prompt=PROMPT, max_tokens=tokens, ignore_eos=True, seed=i
    )


class MuxClient:
    """Many requests on one Generate stream, replies dispatched by request id."""

    def __init__(self, stub: replica_pb2_grpc.ReplicaStub) -> None:
        self.outgoing: asyncio.Queue[replica_pb2.GenerateClientMessage] = asyncio.Queue()
        self.waiters: dict[str, asyncio.Queue[replica_pb2.RequestDelta]] = {}
        self.call = stub.Generate(self._messages())
        self.reader = asyncio.create_task(self._read())

    async def _messages(self) -> AsyncIterator[replica_pb2.GenerateClientMessage]:
        while True:
            yield await self.outgoing.get()

    async def _read(self) -> None:
        async for reply in self.call:
            for delta in reply.deltas:
                self.waiters[delta.request_id].put_nowait(delta)

    async def run(self, request: replica_pb2.GenerateRequest) -> int:
        queue: asyncio.Queue[replica_pb2.RequestDelta] = asyncio.Queue()
        self.waiters[request.request_id] = queue
        self.outgoing.put_nowait(replica_pb2.GenerateClientMessage(request=request))
        tokens = 0
        try:
            while True:
                delta = await queue.get()
                tokens += delta.num_tokens
                if delta.finish_reason:
                    if delta.error.code:
                        raise RuntimeError(delta.error.message)
                    return tokens
        finally:
            del self.waiters[request.request_id]

    def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()


async def per_request(
    stub: replica_pb2_grpc.ReplicaStub, request: replica_pb2.GenerateRequest
) -> int:
    async def one() -> AsyncIterator[replica_pb2.GenerateClientMessage]:
        yield replica_pb2.GenerateClientMessage(request=request)

    tokens = 0
    async for reply in stub.Generate(one()):
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

    from replica.engine import VllmEngine

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
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

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

    from tests.procs import start_replica

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
