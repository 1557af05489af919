"""The whole serving path against vLLM's own OpenAI server, real engine, one run.

The bundled model is served first one way, then the other, never both at once
(each takes both cores): `vllm` is `vllm.entrypoints.openai.api_server` on the
converted model; `mss` is `mss replica --engine vllm` behind `mss gateway`,
with the same engine settings (float32, eager, 2,048-token context, 1 GiB of
KV cache, 256 sequences, prefix caching on). The bench kit's load generator
drives each at every concurrency with closed-loop streaming chat requests.
Targets run in `--order` (default vllm, mss, mss, vllm: each order of the two
is tried, and each target is measured early and late in the run); every
start gets its own label (`vllm#1`, `mss#2`...).

    python -m loadtest.bench_vs_vllm [--concurrency 16,64] [--duration 60]

`--profile` records the serving processes with py-spy (`--py-spy PATH`) for
20 s in the middle of each target's run at the highest concurrency: the
replica's or the API server's own thread, beside vLLM's engine-core process.

Over each measured window the CPU each serving process used is read from
`/proc` one process at a time (the load generator's figure sums a process
with its children): the model worker, vLLM's engine core, and the rest of
the serving path (vLLM's API server, or our replica's front end plus the
gateway). Both stacks run the same engine, so what the path beside it takes
is what a stack can win or lose.
Results: `loadtest/results/bench_vs_vllm-STAMP.{jsonl,md}`, the CPU split in
`bench_vs_vllm-STAMP-cpu.jsonl`, and the profiles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from loadtest.bench_gateway import Procs, free_port, normalise, run_load, wait_http, window_args

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtest" / "results"
MODEL = "smollm2"
PROMPT = "Write a short story about a lighthouse."
ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}


def start_vllm(procs: Procs, model_path: Path, label: str) -> tuple[str, dict[str, int]]:
    port = free_port()
    env = dict(os.environ, **ENGINE_ENV)
    proc = procs.start(
        label,
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_path),
            "--served-model-name",
            MODEL,
            "--enforce-eager",
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            "--max-num-seqs",
            "256",
            "--seed",
            "0",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models", timeout=600)
    return url, {"server": proc.pid}


def start_mss(procs: Procs, label: str) -> tuple[str, dict[str, int]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **ENGINE_ENV)
    env.pop("VLLM_CPU_KVCACHE_SPACE")  # the deployment's kv_cache_gib (1) says it
    replica_port, gateway_port = free_port(), free_port()
    mss = [sys.executable, "-m", "mss.cli"]
    replica = procs.start(
        f"{label}-replica",
        [
            *mss,
            "replica",
            "--engine",
            "vllm",
            "--port",
            str(replica_port),
            "--log-level",
            "WARNING",
        ],
        env,
    )
    gateway = procs.start(
        f"{label}-gateway",
        [
            *mss,
            "gateway",
            "--port",
            str(gateway_port),
            "--replica",
            f"{MODEL}=127.0.0.1:{replica_port}",
            "--log-level",
            "WARNING",
        ],
        env,
    )
    url = f"http://127.0.0.1:{gateway_port}"
    wait_http(url + "/ready", timeout=600)
    return url, {"replica": replica.pid, "gateway": gateway.pid}


def profile(args: argparse.Namespace, pids: dict[str, int], label: str, stamp: str) -> None:
    """py-spy on each serving process for 20 s, started after the load has run a while."""
    time.sleep(args.warmup + min(15.0, args.duration / 3))
    for name, pid in pids.items():
        out = RESULTS / f"bench_vs_vllm-{stamp}-{label}-{name}.txt"
        spy = [args.py_spy, "record", "--format", "raw", "--gil", "-r", "100", "-d", "20"]
        subprocess.Popen(
            [*spy, "--subprocesses", "-p", str(pid), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def cpu_by_role(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each role: vLLM's model worker and engine core
    wherever they run, everything else under the watched name that started it."""
    used: dict[str, float] = {}
    for name, root in pids.items():
        try:
            top = psutil.Process(root)
            tree = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            try:
                comm, times = proc.name(), proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            role = (
                "worker"
                if comm.startswith("VLLM::Worker")
                else "engine core"
                if comm.startswith("VLLM::EngineCor")
                else name
            )
            used[role] = used.get(role, 0.0) + times.user + times.system
    return used


def split_cpu(args: argparse.Namespace, pids: dict[str, int], found: dict[str, float]) -> None:
    """Per-role CPU % over the load generator's measured window (after its warm-up)."""
    time.sleep(args.warmup)
    start, t0 = cpu_by_role(pids), time.monotonic()
    time.sleep(args.duration)
    end, elapsed = cpu_by_role(pids), time.monotonic() - t0
    found.update({k: 100.0 * (v - start.get(k, 0.0)) / elapsed for k, v in end.items()})


def measure(
    args: argparse.Namespace, url: str, pids: dict[str, int], label: str, c: int, out: Path
) -> dict[str, float]:
    """One load generator run against `url`; returns the CPU split of its window."""
    watch = [arg for name, pid in pids.items() for arg in ("--watch", f"{name}={pid}")]
    cmd = [
        args.kit_python,
        str(Path(args.bench_kit) / "loadgen.py"),
        "--url",
        url,
        "--model",
        MODEL,
        "--prompt",
        PROMPT,
        "--max-tokens",
        str(args.max_tokens),
        "--req-timeout",
        "300",
        *window_args(c, args.duration, args.warmup, args.ramp, out, label),
        *watch,
    ]
    split: dict[str, float] = {}
    sampler = threading.Thread(target=split_cpu, args=(args, pids, split), daemon=True)
    sampler.start()
    run_load(cmd, label, c, args.duration + args.warmup + 600)
    sampler.join(timeout=5)
    return split


def report(rows: list[dict[str, Any]], splits: dict[tuple[str, int], dict[str, float]]) -> str:
    lines = [
        "| C | run | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | requests | errors "
        "| CPU % by process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted({r["C"] for r in rows}):
        for r in (r for r in rows if r["C"] == c):
            ttft, itl = r["ttft_ms"], r["itl_ms"]
            split = splits.get((r["label"], c)) or r["cpu_pct"]
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in split.items())
            lines.append(
                f"| {c} | {r['label']} | {r['tok_s']:.1f} | {ttft['50']:.0f} / {ttft['99']:.0f} | "
                f"{itl['50']:.1f} / {itl['99']:.1f} | {r['completed']} | {r['errors']} | {cpu} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bench-kit", default=str(ROOT.parent / "shared" / "bench"))
    default_work = os.environ.get("BENCH_WORK") or str(
        Path(os.environ.get("TMPDIR", "/tmp")) / "router-bench"
    )
    p.add_argument("--bench-work", default=default_work, help="the kit's work folder")
    p.add_argument("--kit-python", default=None, help="python for the kit (default: its venv-base)")
    p.add_argument("--concurrency", default="16,64")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument(
        "--ramp",
        type=float,
        default=1.0,
        help="seconds over which the load generator opens its clients (spread, as a "
        "real engine's clients would be; at these concurrencies all open within the warm-up)",
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--order", default="vllm,mss,mss,vllm")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--py-spy", default="py-spy")
    args = p.parse_args(argv)
    if not (Path(args.bench_kit) / "loadgen.py").exists():
        print(f"bench kit not found in {args.bench_kit} (give --bench-kit DIR)", file=sys.stderr)
        return 2
    if args.kit_python is None:
        venv = Path(args.bench_work) / "venv-base" / "bin" / "python"
        args.kit_python = str(venv) if venv.exists() else sys.executable
    os.environ.update(HF_HUB_OFFLINE="1")
    from replica.model_store import resolve_model

    model_path = resolve_model(MODEL)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"bench_vs_vllm-{stamp}.jsonl"
    cpu_out = RESULTS / f"bench_vs_vllm-{stamp}-cpu.jsonl"
    splits: dict[tuple[str, int], dict[str, float]] = {}
    logs = Path(tempfile.mkdtemp(prefix="mss-bench-vllm-"))
    print(f"# logs in {logs}")
    for n, target in enumerate(args.order.split(","), 1):
        label = f"{target}#{n}"
        procs = Procs(logs)
        try:
            if target == "vllm":
                url, pids = start_vllm(procs, model_path, label)
            else:
                url, pids = start_mss(procs, label)
            for c in concurrency:
                if args.profile and c == max(concurrency):
                    threading.Thread(
                        target=profile, args=(args, pids, label, stamp), daemon=True
                    ).start()
                split = measure(args, url, pids, label, c, out)
                splits[(label, c)] = split
                with cpu_out.open("a") as f:
                    f.write(json.dumps({"label": label, "C": c, "cpu_pct": split}) + "\n")
        finally:
            procs.stop()
    rows = [normalise(json.loads(line)) for line in out.read_text().splitlines() if line.strip()]
    header = (
        f"# vLLM's OpenAI server against mss (gateway + replica), {stamp}: bundled model, "
        f"float32, {args.max_tokens} output tokens, {args.duration:g} s per point, "
        f"order {args.order}\n\n"
    )
    table = report(rows, splits)
    (RESULTS / f"bench_vs_vllm-{stamp}.md").write_text(header + table + "\n")
    print(header + table)
    print(f"\n# results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
