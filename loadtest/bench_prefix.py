"""Prefix-aware routing against round_robin and least_loaded, on the real engine.

Two replicas of the bundled model, one CPU core each (`VLLM_CPU_OMP_THREADS_BIND`),
behind one gateway started anew for each strategy; closed-loop streaming
clients on `/v1/chat/completions`. Two workloads:

- `shared`: `--system-prompts` long system prompts (about `--prefix-tokens`
  tokens each) that many conversations share. Each client holds a
  conversation: it starts on a random system prompt, asks a short question,
  and asks again with the answers so far appended, for `--turns` turns, then
  starts a new one. Both shared system prompts and a conversation's growing
  history are prefixes a replica may already hold.
- `unique`: every request a new prompt of the same length: nothing to share.

Every output is `--max-tokens` long (`min_tokens`, greedy), so the strategies
do the same work per request. Each run uses prompts of its own (a salt in every
text), so no run reuses what an earlier one left in the replicas' caches. The
replicas' prefix-cache counters are read before and after each run.

    python -m loadtest.bench_prefix --out docs/benchmarks-raw/prefix   # about 15 min

Prints a Markdown table (TTFT p50/p99, output tokens/s, prefix-cache hit rate
per workload and strategy) and writes one JSON line per request and one per
run under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.bench_gateway import Procs, free_port, pct, wait_http, wait_replica

MODEL = "smollm2"
STRATEGIES = ("round_robin", "least_loaded", "prefix_aware")
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part "
    "river mountain engine system cache request replica token stream gateway router model "
    "policy garden window letter market season answer question picture station history"
).split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_prefix", description=__doc__)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--workloads", default="shared,unique")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop streaming clients")
    parser.add_argument("--duration", type=float, default=90.0, help="measured seconds per run")
    parser.add_argument(
        "--unique-duration",
        type=float,
        default=None,
        help="measured seconds per run of the unique workload (default --duration): its "
        "requests are all misses, a few a minute per replica, so it needs longer for as many",
    )
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before measuring")
    parser.add_argument("--system-prompts", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=1500, help="about, per long prompt")
    parser.add_argument("--turns", type=int, default=4, help="questions per conversation")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--kv-cache-gib",
        type=float,
        default=1.0,
        help="KV cache per replica (1 GiB holds about 23,000 tokens of this model)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder for the raw results")
    return parser.parse_args(argv)


def text_of(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


# ---------------------------------------------------------------- workload


@dataclass
class Conversation:
    system: str
    messages: list[dict[str, str]] = field(default_factory=list)
    turns: int = 0


class Workload:
    """The requests one client sends, one after another."""

    def __init__(self, kind: str, args: argparse.Namespace, salt: str, client: int) -> None:
        self.kind = kind
        self.args = args
        self.rng = random.Random(f"{args.seed}-{salt}-{client}")
        # About 1.3 tokens a word for these words with this tokenizer.
        self.prefix_words = int(args.prefix_tokens / 1.3)
        shared = random.Random(f"{args.seed}-{salt}-system")
        self.systems = [
            f"[{salt} #{i}] You are assistant {i}. " + text_of(shared, self.prefix_words)
            for i in range(args.system_prompts)
        ]
        self.conversation: Conversation | None = None

    def next_messages(self) -> list[dict[str, str]]:
        question = text_of(self.rng, 12) + "?"
        if self.kind == "unique":
            unique = f"[{self.rng.random():.12f}] " + text_of(self.rng, self.prefix_words)
            return [{"role": "system", "content": unique}, {"role": "user", "content": question}]
        conv = self.conversation
        if conv is None or conv.turns >= self.args.turns:
            conv = self.conversation = Conversation(self.rng.choice(self.systems))
        conv.messages.append({"role": "user", "content": question})
        conv.turns += 1
        return [{"role": "system", "content": conv.system}, *conv.messages]

    def answered(self, text: str) -> None:
        if self.conversation is not None and self.kind == "shared":
            self.conversation.messages.append({"role": "assistant", "content": text})


# ---------------------------------------------------------------- measuring


async def one_request(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": MODEL,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "temperature": 0,
    }
    started = time.monotonic()
    first = 0.0
    text = ""
    usage: dict[str, int] = {}
    error = ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            error = f"{response.status_code}: {(await response.aread())[:200]!r}"
        else:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if data.get("error"):
                    error = str(data["error"])[:200]
                for choice in data.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if not first:
                            first = time.monotonic()
                        text += content
                if data.get("usage"):
                    usage = data["usage"]
    ended = time.monotonic()
    return {
        "start": started,
        "end": ended,
        "ttft_s": (first - started) if first else None,
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "output_tokens": usage.get("completion_tokens", 0),
        "text": text,
        "error": error,
    }


async def run_load(
    url: str, kind: str, args: argparse.Namespace, salt: str, duration: float
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    begin = time.monotonic()
    stop_at = begin + args.warmup + duration

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        workload = Workload(kind, args, salt, i)
        while time.monotonic() < stop_at:
            messages = workload.next_messages()
            try:
                row = await one_request(client, url, messages, args.max_tokens)
            except httpx.HTTPError as exc:
                row = {"start": time.monotonic(), "end": time.monotonic(), "error": repr(exc)}
            workload.answered(row.get("text", ""))
            row["client"] = i
            row["turn"] = workload.conversation.turns if workload.conversation else 0
            row["measured"] = row["start"] >= begin + args.warmup and row["end"] <= stop_at
            row.pop("text", None)
            results.append(row)

    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(args.clients)))
    return results


def prefix_counters(metrics_port: int) -> tuple[float, float]:
    """(queried, hit) prompt tokens of one replica's prefix cache so far."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))

    return (
        total("mss_replica_prefix_cache_queries_total"),
        total("mss_replica_prefix_cache_hits_total"),
    )


def summarize(rows: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    measured = [r for r in rows if r.get("measured")]
    ok = [r for r in measured if not r.get("error") and r.get("ttft_s") is not None]
    ttfts = sorted(r["ttft_s"] for r in ok)
    return {
        "requests": len(measured),
        "errors": sum(1 for r in measured if r.get("error")),
        "ttft_p50_s": pct(ttfts, 50) if ttfts else None,
        "ttft_p99_s": pct(ttfts, 99) if ttfts else None,
        "output_tok_s": sum(r["output_tokens"] for r in ok) / duration,
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in ok) / len(ok) if ok else 0,
    }


# ---------------------------------------------------------------- processes


def gateway_config(args: argparse.Namespace) -> str:
    return (
        "gateway:\n  retries: 0\n"
        f"deployments:\n  - name: {MODEL}\n    engine: vllm\n"
        "    limits: {max_in_flight: 1000, max_queue: 1000, max_tokens: 4096}\n"
    )


def start_replicas(args: argparse.Namespace, procs: Procs) -> list[tuple[str, int]]:
    """Two replicas, one core each; (gRPC address, metrics port) of each."""
    deployment = {
        "name": MODEL,
        "engine": "vllm",
        "engine_args": {"max_model_len": 4096, "kv_cache_gib": args.kv_cache_gib},
    }
    mss = str(Path(sys.executable).with_name("mss"))
    out = []
    for core in (0, 1):
        port, metrics_port = free_port(), free_port()
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(core), HF_HUB_OFFLINE="1")
        cmd = [mss, "replica", "--deployment-json", json.dumps(deployment), "--port", str(port)]
        cmd += ["--metrics-port", str(metrics_port), "--replica-id", f"{MODEL}-core{core}"]
        procs.start(f"replica-core{core}", cmd, env)
        out.append((f"127.0.0.1:{port}", metrics_port))
    for address, _ in out:
        wait_replica(address, timeout=600)
    return out


def start_gateway(
    args: argparse.Namespace,
    procs: Procs,
    replicas: list[tuple[str, int]],
    strategy: str,
    cfg: Path,
) -> tuple[str, Any]:
    port = free_port()
    mss = str(Path(sys.executable).with_name("mss"))
    cmd = [mss, "gateway", "--port", str(port), "--routing", strategy, "--config", str(cfg)]
    for address, _ in replicas:
        cmd += ["--replica", f"{MODEL}={address}"]
    proc = procs.start(f"gateway-{strategy}", cmd)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", timeout=60)
    return url, proc


def report(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | strategy | requests | TTFT p50 s | TTFT p99 s | output tok/s "
        "| prefix-cache hit rate | vs least_loaded (TTFT p50, tok/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        base = next(
            (
                r
                for r in runs
                if r["workload"] == run["workload"] and r["strategy"] == "least_loaded"
            ),
            None,
        )
        vs = ""
        if base and base["ttft_p50_s"] and run["ttft_p50_s"] and base["output_tok_s"]:
            vs = (
                f"{run['ttft_p50_s'] / base['ttft_p50_s']:.2f}x, "
                f"{run['output_tok_s'] / base['output_tok_s']:.2f}x"
            )
        p50 = f"{run['ttft_p50_s']:.2f}" if run["ttft_p50_s"] is not None else "-"
        p99 = f"{run['ttft_p99_s']:.2f}" if run["ttft_p99_s"] is not None else "-"
        lines.append(
            f"| {run['workload']} | {run['strategy']} | {run['requests']} | {p50} | {p99} "
            f"| {run['output_tok_s']:.1f} | {run['hit_rate']:.1%} | {vs} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-prefix-logs-"))
    procs = Procs(logs)
    cfg = logs / "gateway.yaml"
    cfg.write_text(gateway_config(args))
    runs: list[dict[str, Any]] = []
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# bench_prefix {stamp}; logs in {logs}", flush=True)
    try:
        replicas = start_replicas(args, procs)
        with open(out / "requests.jsonl", "w") as requests_file:
            for w, workload in enumerate(workloads):
                # Each workload tries the strategies in another order.
                order = strategies[w % len(strategies) :] + strategies[: w % len(strategies)]
                for strategy in order:
                    url, gateway = start_gateway(args, procs, replicas, strategy, cfg)
                    before = [prefix_counters(m) for _, m in replicas]
                    salt = f"{workload}-{strategy}-{time.time_ns()}"
                    duration = args.duration
                    if workload == "unique" and args.unique_duration:
                        duration = args.unique_duration
                    rows = asyncio.run(run_load(url, workload, args, salt, duration))
                    after = [prefix_counters(m) for _, m in replicas]
                    gateway.terminate()
                    gateway.wait(30)
                    queried = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
                    hits = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
                    run = {"workload": workload, "strategy": strategy, "at": stamp}
                    run |= summarize(rows, duration)
                    run["duration_s"] = duration
                    run["hit_rate"] = hits / queried if queried else 0.0
                    run["per_replica_hit_rate"] = [
                        (a[1] - b[1]) / (a[0] - b[0]) if a[0] > b[0] else 0.0
                        for a, b in zip(after, before, strict=True)
                    ]
                    run["prefix_counters_before"] = before
                    run["prefix_counters_after"] = after
                    runs.append(run)
                    for row in rows:
                        requests_file.write(
                            json.dumps({"workload": workload, "strategy": strategy} | row) + "\n"
                        )
                    print(json.dumps(run), flush=True)
    finally:
        procs.stop()
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    settings = (
        f"{args.clients} clients, {args.duration:.0f} s measured "
        f"({args.unique_duration or args.duration:.0f} s for unique) after {args.warmup:.0f} s, "
        f"{args.system_prompts} system prompts of ~{args.prefix_tokens} tokens, "
        f"{args.turns} turns, {args.max_tokens} output tokens, "
        f"KV cache {args.kv_cache_gib} GiB per replica"
    )
    table = report(runs)
    (out / "table.md").write_text(f"{stamp}: {settings}\n\n{table}\n")
    print(f"\n{settings}\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
