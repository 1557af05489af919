"""What one gRPC message between two of our processes costs, by how gRPC polls its sockets.

A client process and a server process hold one bidirectional stream, as a
gateway holds one to each replica; the client writes a 100-byte message and
waits for the server's echo, `--messages` times after a warm-up. Measured for
each value of GRPC_EXPERIMENTS (gRPC reads it once, when it is imported, so
each runs in fresh processes):

- `grpc default` (GRPC_EXPERIMENTS empty): gRPC's EventEngine hands each
  socket's reads and writes to its own thread pool, which then wakes the
  completion-queue poller;
- `mss`: what the `mss` command sets (`mss.cli.GRPC_EXPERIMENTS`), the
  completion-queue poller polls the sockets itself.

Reported per round trip: the median and p99 time, the CPU of both processes
together, and their context switches together (every thread's voluntary and
involuntary switches from /proc), the wakes that compete with an engine's
threads for the cores.

    python -m loadtest.grpc_hops [--messages 5000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil

from mss.cli import GRPC_EXPERIMENTS

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"grpc default": "", "mss": GRPC_EXPERIMENTS}
SERVICE, METHOD = "hops.Echo", "Chat"


def same(raw: bytes) -> bytes:
    """Messages are raw bytes both ways: no serialization to measure."""
    return raw


def switches(pid: int) -> int:
    """Voluntary plus involuntary context switches of every thread of `pid` so far (psutil's
    `num_ctx_switches` counts the main thread's alone, and gRPC's work is on others)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                for line in status:
                    if "ctxt_switches" in line:
                        total += int(line.split()[1])
        except OSError:  # the thread ended between listing and reading
            pass
    return total


async def serve() -> None:
    """Echo every message back on its stream until stdin closes; print the port first."""
    import grpc
    from grpc import aio

    async def chat(requests: AsyncIterator[bytes], _context: object) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message

    server = aio.server()
    handler = grpc.stream_stream_rpc_method_handler(chat, same, same)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(None)


async def drive(port: int, server_pid: int, messages: int) -> dict[str, float]:
    """The client side: ping-pong `messages` times after a warm-up, measuring both processes."""
    from grpc import aio

    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.stream_stream(
        f"/{SERVICE}/{METHOD}", request_serializer=same, response_deserializer=same
    )()
    body = b"x" * 100
    for _ in range(200):
        await call.write(body)
        await call.read()
    procs = [psutil.Process(), psutil.Process(server_pid)]
    pids = [p.pid for p in procs]
    cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
    sw0 = sum(switches(pid) for pid in pids)
    times = []
    for _ in range(messages):
        start = time.perf_counter()
        await call.write(body)
        await call.read()
        times.append(time.perf_counter() - start)
    cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - sum(cpu0)
    sw = sum(switches(pid) for pid in pids) - sw0
    await call.done_writing()
    await channel.close()
    times.sort()
    return {
        "rtt_p50_us": statistics.median(times) * 1e6,
        "rtt_p99_us": times[int(len(times) * 0.99)] * 1e6,
        "cpu_us": cpu / messages * 1e6,
        "switches": sw / messages,
    }


def inside(messages: int) -> None:
    """Run in a fresh process with GRPC_EXPERIMENTS already set: start the server, drive it."""
    server = subprocess.Popen(
        [sys.executable, "-m", "loadtest.grpc_hops", "--serve"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdin is not None
        port = int(server.stdout.readline())
        result = asyncio.run(drive(port, server.pid, messages))
        print(" ".join(f"{k}={v:.3f}" for k, v in result.items()), flush=True)
    finally:
        if server.stdin:
            server.stdin.close()
        server.wait(timeout=10)


def measure(setting: str, messages: int) -> dict[str, float]:
    env = dict(os.environ, GRPC_EXPERIMENTS=setting, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.grpc_hops", "--inside", "--messages", str(messages)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    last = done.stdout.strip().splitlines()[-1]
    return {k: float(v) for k, v in (pair.split("=") for pair in last.split())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=5000, help="round trips measured per run")
    p.add_argument("--rounds", type=int, default=2, help="runs of each setting, interleaved")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(serve())
        return 0
    if args.inside:
        inside(args.messages)
        return 0
    print(
        "| round | setting | GRPC_EXPERIMENTS | RTT p50 / p99 us | CPU us per round trip "
        "| context switches per round trip |"
    )
    print("|---|---|---|---|---|---|")
    for n in range(1, args.rounds + 1):
        for name, setting in SETTINGS.items():
            r = measure(setting, args.messages)
            shown = f"`{setting}`" if setting else "(empty)"
            print(
                f"| {n} | {name} | {shown} | {r['rtt_p50_us']:.0f} / "
                f"{r['rtt_p99_us']:.0f} | {r['cpu_us']:.0f} | {r['switches']:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
