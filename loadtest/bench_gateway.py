"""What the gateway adds to streaming, beside two Rust routers, measured in one run.

For each concurrency C (closed loop: C clients each streaming requests of 64
tokens at 10 ms per token back to back), five targets are measured one after
the other on the same machine:

- `direct`: the bench kit's fake OpenAI SSE backend, reached directly;
- `smg`, `vllm-router`: the kit's two Rust routers in front of that backend
  (when installed under BENCH_WORK by the kit's setup_peers.sh);
- `replica`: our fake-engine replica reached directly over gRPC, by the
  closed-loop gRPC load generator in this file (one multiplexed Generate
  stream, as the gateway uses);
- `ours`: the same replica through `mss gateway`.

The HTTP targets are driven by the kit's `loadgen.py`; routers are compared
with `direct`, our gateway with `replica` (its own backend). The report gives
the throughput ratio, the added TTFT p50/p99 and inter-token p99, the
router's CPU time per streamed chunk, and about how many clients were in a
request at a time (*in flight*: req/s times the median end-to-end time, by
Little's law), which shows each target was measured at its C. Beside each
HTTP target's load generator, `loadtest.ttft_probe` sends one short request at
a time from its own process (`--no-probe`: not): its time to first token is
the target's alone, where the load generator's also holds its own event loop,
busy with every other stream's tokens.

All C clients open at once (`--ramp 0`, the default here). The kit's default
paces the opens over a second with one sleep per client, and on a loaded event
loop each sleep lasts a turn of that loop: at C=1,000 the last clients then
open 8-16 s later, later the less CPU the target leaves the load generator,
so targets would be compared at different concurrencies. Opened together,
the clients start as one burst, the same for every target.

The kit is used from where it lies (`--bench-kit`, default `../shared/bench`
beside the repository); nothing of it is copied here.

    python -m loadtest.bench_gateway [--concurrency 1,64,256,1000] [--duration 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtest" / "results"
MODEL = "fake-model"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    k = (len(values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# --- closed-loop gRPC load generator (the `replica` baseline) -------------------------------


@dataclass
class GrpcResults:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    ntok: list[int] = field(default_factory=list)
    completed: int = 0
    window_tokens: int = 0
    errors: list[str] = field(default_factory=list)


async def grpc_load(
    address: str, concurrency: int, duration: float, warmup: float, tokens: int, ramp: float
) -> GrpcResults:
    """C workers streaming requests back to back over one multiplexed Generate stream."""
    import grpc

    from mss.security import local_metadata
    from protos import replica_pb2, replica_pb2_grpc

    res = GrpcResults()
    loop = asyncio.get_running_loop()
    start = loop.time()
    win0, win1 = start + warmup, start + warmup + duration
    channel = grpc.aio.insecure_channel(address)
    call = replica_pb2_grpc.ReplicaStub(channel).Generate(metadata=local_metadata())
    inboxes: dict[str, asyncio.Queue[tuple[float, Any]]] = {}
    outbox: asyncio.Queue[Any] = asyncio.Queue()

    async def reader() -> None:
        while True:
            reply = await call.read()
            if reply is grpc.aio.EOF:
                return
            now = loop.time()
            for d in reply.deltas:
                inbox = inboxes.get(d.request_id)
                if inbox is not None:
                    inbox.put_nowait((now, d))

    async def writer() -> None:
        while True:
            await call.write(await outbox.get())

    async def worker(n: int) -> None:
        i = 0
        while loop.time() < win1:
            rid = f"w{n}-{i}"
            i += 1
            inbox: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()
            inboxes[rid] = inbox
            sent = loop.time()
            request = replica_pb2.GenerateRequest(
                request_id=rid,
                prompt="Say hello.",
                sampling=replica_pb2.SamplingParams(max_tokens=tokens),
            )
            outbox.put_nowait(replica_pb2.GenerateClientMessage(request=request))
            first = last = None
            gaps: list[float] = []
            count = 0
            while True:
                now, d = await inbox.get()
                if d.error.code:
                    res.errors.append(d.error.message)
                    break
                if d.text:
                    count += 1
                    if win0 <= now < win1:
                        res.window_tokens += 1
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)  # type: ignore[operator]
                    last = now
                if d.finish_reason:
                    break
            del inboxes[rid]
            if sent >= win0 and first is not None:
                res.ttft.append(first - sent)
                res.e2e.append(loop.time() - sent)
                res.itl.extend(gaps)
                res.ntok.append(count)
                res.completed += 1

    tasks = [asyncio.create_task(reader()), asyncio.create_task(writer())]
    workers = []
    for n in range(concurrency):
        workers.append(asyncio.create_task(worker(n)))
        if ramp and concurrency > 1:
            await asyncio.sleep(ramp / concurrency)
    await asyncio.gather(*workers)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    return res


def run_grpc_loadgen(args: argparse.Namespace) -> int:
    """`grpc-loadgen` mode: one measurement, one JSON line in loadgen's format."""
    import psutil
    import uvloop

    watched = {name: psutil.Process(int(pid)) for name, pid in (w.split("=") for w in args.watch)}

    def cpu() -> dict[str, float]:
        out = {}
        for name, proc in watched.items():
            total = 0.0
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
            out[name] = total
        return out

    async def main() -> tuple[GrpcResults, dict[str, float]]:
        task = asyncio.create_task(
            grpc_load(
                args.address, args.concurrency, args.duration, args.warmup, args.tokens, args.ramp
            )
        )
        await asyncio.sleep(args.warmup)
        c0 = cpu()
        await asyncio.sleep(args.duration)
        c1 = cpu()
        res = await task
        return res, {k: round(100.0 * (c1[k] - c0[k]) / args.duration, 1) for k in c0}

    res, cpu_pct = uvloop.run(main())

    def ms(values: list[float]) -> dict[str, float]:
        s = sorted(values)
        return {str(p): round(pct(s, p) * 1000, 2) for p in (50, 95, 99)}

    out = {
        "label": args.label,
        "url": f"grpc://{args.address}",
        "C": args.concurrency,
        "duration": args.duration,
        "completed": res.completed,
        "rps": round(res.completed / args.duration, 1),
        "tok_s": round(res.window_tokens / args.duration, 0),
        "errors": len(res.errors),
        "error_samples": res.errors[:5],
        "tokens_per_req_mean": round(sum(res.ntok) / len(res.ntok), 2) if res.ntok else 0,
        "ttft_ms": ms(res.ttft),
        "itl_ms": ms(res.itl),
        "e2e_ms": ms(res.e2e),
        "cpu_pct": cpu_pct,
    }
    print(
        f"[{args.label}] C={args.concurrency} req/s={out['rps']} tok/s={out['tok_s']} "
        f"TTFT p50/p99={out['ttft_ms']['50']}/{out['ttft_ms']['99']} ms err={out['errors']}"
    )
    with open(args.json, "a") as f:
        f.write(json.dumps(out) + "\n")
    return 0


# --- orchestration ---------------------------------------------------------------------------


@dataclass
class Target:
    label: str
    url: str
    pid: int
    baselines: list[str]
    """Labels this target is compared with, first the main one."""
    backend_pid: int = 0
    grpc: bool = False


class Procs:
    """Children started by the benchmark; all stopped, by PID, at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def wait_http(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")


def wait_replica(address: str, timeout: float = 60.0) -> None:
    import grpc

    from mss.security import local_metadata
    from protos import replica_pb2, replica_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(address) as channel:
                stub = replica_pb2_grpc.ReplicaStub(channel)
                health = stub.Health(
                    replica_pb2.HealthRequest(), timeout=1.0, metadata=local_metadata()
                )
                if health.ready:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"replica {address} not ready within {timeout:.0f} s")


def start_targets(args: argparse.Namespace, kit: Path, procs: Procs) -> list[Target]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    py = sys.executable
    kit_py = args.kit_python
    targets: list[Target] = []

    backend_port = free_port()
    backend = procs.start(
        "fake_backend",
        [
            kit_py,
            str(kit / "fake_backend.py"),
            "--port",
            str(backend_port),
            "--tokens",
            str(args.tokens),
            "--interval-ms",
            str(args.interval_ms),
            "--model",
            MODEL,
        ],
    )
    backend_url = f"http://127.0.0.1:{backend_port}"
    wait_http(backend_url + "/v1/models")
    targets.append(Target("direct", backend_url, backend.pid, []))

    work = Path(args.bench_work)
    peers = {
        "smg": work / "venv-smg" / "bin" / "smg",
        "vllm-router": work / "venv-vllmrouter" / "bin" / "vllm-router",
    }
    for name, binary in peers.items():
        if not binary.exists():
            print(f"# {name}: not installed under {work} (run the kit's setup_peers.sh); skipped")
            continue
        port, prom = free_port(), free_port()
        cmd = (
            [str(binary)]
            + (["launch"] if name == "smg" else [])
            + [
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--worker-urls",
                backend_url,
                "--prometheus-port",
                str(prom),
                "--log-level",
                "warn" if name == "smg" else "warning",
            ]
        )
        proc = procs.start(name, cmd)
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        targets.append(Target(name, f"http://127.0.0.1:{port}", proc.pid, ["direct"], backend.pid))

    replica_port = free_port()
    replica = procs.start(
        "replica",
        [
            py,
            "-m",
            "mss.cli",
            "replica",
            "--engine",
            "fake",
            "--name",
            MODEL,
            "--port",
            str(replica_port),
            "--token-interval-ms",
            str(args.interval_ms),
            "--max-in-flight",
            "100000",
            "--log-level",
            "WARNING",
        ],
        env,
    )
    replica_address = f"127.0.0.1:{replica_port}"
    wait_replica(replica_address)
    targets.append(Target("replica", replica_address, replica.pid, [], grpc=True))

    config = Path(tempfile.mkdtemp(prefix="mss-bench-")) / "gateway.yaml"
    config.write_text(
        f"gateway: {{workers: {args.workers}, stream_buffer_chunks: 4096}}\n"
        f"deployments:\n  - name: {MODEL}\n    engine: fake\n    model: fake\n"
        f"    limits: {{max_in_flight: 100000, max_queue: 100000, max_tokens: {args.tokens}}}\n"
    )
    gw_port = free_port()
    gateway = procs.start(
        "gateway",
        [
            py,
            "-m",
            "mss.cli",
            "gateway",
            "--config",
            str(config),
            "--port",
            str(gw_port),
            "--replica",
            f"{MODEL}={replica_address}",
            "--replica-streams",
            str(args.replica_streams),
            "--log-level",
            "WARNING",
        ],
        env,
    )
    wait_http(f"http://127.0.0.1:{gw_port}/ready")
    url = f"http://127.0.0.1:{gw_port}"
    targets.append(Target("ours", url, gateway.pid, ["replica", "direct"], replica.pid))
    return targets


def window_args(
    c: int, duration: float, warmup: float, ramp: float, out: Path, label: str
) -> list[str]:
    """The load generators' shared arguments: concurrency, window, ramp, where results go."""
    window = ["-c", str(c), "-d", str(duration), "--warmup", str(warmup), "--ramp", str(ramp)]
    return [*window, "--json", str(out), "--label", label]


def run_load(cmd: list[str], label: str, c: int, timeout: float) -> None:
    """Run one load generator to its end; its summary goes to stdout, a failure is said."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        print(f"# {label} C={c} failed:\n{done.stderr[-2000:]}")


def start_probe(args: argparse.Namespace, target: Target, c: int, out: Path) -> subprocess.Popen:
    """`loadtest.ttft_probe` beside the load generator, over its measured window."""
    cmd = [
        sys.executable,
        "-m",
        "loadtest.ttft_probe",
        "--url",
        target.url,
        "--model",
        MODEL,
        "--delay",
        str(args.warmup + args.ramp),
        "--duration",
        str(args.duration),
        "-c",
        str(c),
        "--label",
        target.label,
        "--json",
        str(out),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def measure(
    args: argparse.Namespace, kit: Path, target: Target, c: int, out: Path, probes: Path
) -> None:
    watch = ["--watch", f"router={target.pid}"]
    if target.backend_pid:
        watch += ["--watch", f"backend={target.backend_pid}"]
    common = window_args(c, args.duration, args.warmup, args.ramp, out, target.label)
    if target.grpc:
        cmd = [
            sys.executable,
            "-m",
            "loadtest.bench_gateway",
            "grpc-loadgen",
            "--address",
            target.url,
            "--tokens",
            str(args.tokens),
            *watch,
            *common,
        ]
    else:
        cmd = [
            args.kit_python,
            str(kit / "loadgen.py"),
            "--url",
            target.url,
            "--model",
            MODEL,
            "--max-tokens",
            str(args.tokens),
            "--procs",
            str(args.loadgen_procs),
            *watch,
            *common,
        ]
    # The probe speaks HTTP: the gRPC baseline has none.
    probe = start_probe(args, target, c, probes) if args.probe and not target.grpc else None
    try:
        run_load(cmd, target.label, c, args.duration + args.warmup + 180)
    finally:
        if probe is not None:
            try:
                stdout, _ = probe.communicate(timeout=args.duration + args.warmup + args.ramp + 60)
                sys.stdout.write(stdout)
            except subprocess.TimeoutExpired:
                probe.kill()
                probe.wait()


def report(rows: list[dict[str, Any]], targets: list[Target]) -> str:
    """One line per target and concurrency, and one more per extra baseline."""
    by = {(r["label"], r["C"]): r for r in rows}
    lines = [
        "| target | vs | C | in flight | req/s | tok/s | throughput ratio | TTFT p50 / p99 ms | "
        "added TTFT p50 / p99 ms | probe TTFT p50 / p90 ms | added probe p50 / p90 ms | "
        "ITL p99 ms | added ITL p99 ms | CPU % | CPU us/chunk | stack CPU us/chunk | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted({r["C"] for r in rows}):
        for t in targets:
            r = by.get((t.label, c))
            if r is None:
                continue
            ttft, itl, probe = r["ttft_ms"], r["itl_ms"], r.get("probe_ttft_ms")
            probe_cell = f"{probe['50']:.1f} / {probe['90']:.1f}" if probe else "-"
            in_flight = r["rps"] * r["e2e_ms"]["50"] / 1000
            cpu = r["cpu_pct"].get("router")
            per_chunk = f"{cpu / 100 / r['tok_s'] * 1e6:.1f}" if cpu and r["tok_s"] else "-"
            # The whole stack: router (or gateway) plus its backend (or replica).
            stack = (cpu or 0.0) + r["cpu_pct"].get("backend", 0.0)
            stack_chunk = f"{stack / 100 / r['tok_s'] * 1e6:.1f}" if stack and r["tok_s"] else "-"
            present = [x for x in t.baselines if (x, c) in by]
            for base_label in present or [""]:
                b = by.get((base_label, c)) if base_label else None
                if b is not None:
                    ratio = f"{r['tok_s'] / b['tok_s']:.3f}" if b["tok_s"] else "-"
                    bt, bi = b["ttft_ms"], b["itl_ms"]
                    added = f"{ttft['50'] - bt['50']:+.1f} / {ttft['99'] - bt['99']:+.1f}"
                    added_itl = f"{itl['99'] - bi['99']:+.1f}"
                    bp = b.get("probe_ttft_ms")
                    added_probe = (
                        f"{probe['50'] - bp['50']:+.1f} / {probe['90'] - bp['90']:+.1f}"
                        if probe and bp
                        else "-"
                    )
                else:
                    ratio, added, added_itl, added_probe = "1 (baseline)", "-", "-", "-"
                lines.append(
                    f"| {t.label} | {base_label or '-'} | {c} | {in_flight:.0f} | {r['rps']} | "
                    f"{r['tok_s']:.0f} | "
                    f"{ratio} | {ttft['50']:.1f} / {ttft['99']:.1f} | {added} | "
                    f"{probe_cell} | {added_probe} | {itl['99']:.1f} | {added_itl} | "
                    f"{cpu if cpu is not None else '-'} | "
                    f"{per_chunk} | {stack_chunk} | {r['errors']} |"
                )
    return "\n".join(lines)


def normalise(row: dict[str, Any]) -> dict[str, Any]:
    """loadgen writes percentile keys as numbers or strings depending on JSON round trips."""
    for key in ("ttft_ms", "itl_ms", "e2e_ms"):
        row[key] = {str(k): v for k, v in row[key].items()}
    return row


def run_bench(args: argparse.Namespace) -> int:
    kit = Path(args.bench_kit).resolve()
    for name in ("fake_backend.py", "loadgen.py"):
        if not (kit / name).exists():
            print(f"bench kit not found: {kit / name} (give --bench-kit DIR)", file=sys.stderr)
            return 2
    if args.kit_python is None:
        venv = Path(args.bench_work) / "venv-base" / "bin" / "python"
        args.kit_python = str(venv) if venv.exists() else sys.executable
    concurrency = [int(c) for c in args.concurrency.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"bench_gateway-{stamp}.jsonl"
    probes = RESULTS / f"bench_gateway-{stamp}-probe.jsonl"
    logs = Path(tempfile.mkdtemp(prefix="mss-bench-logs-"))
    procs = Procs(logs)
    try:
        targets = start_targets(args, kit, procs)
        print(f"# targets: {', '.join(f'{t.label}={t.url}' for t in targets)}; logs in {logs}")
        for c in concurrency:
            for target in targets:
                if args.only and target.label not in args.only.split(","):
                    continue
                if args.wait_quiet and (kit / "wait_quiet.py").exists():
                    subprocess.run(
                        [args.kit_python, str(kit / "wait_quiet.py"), "30", str(args.wait_quiet)],
                        timeout=args.wait_quiet + 30,
                    )
                measure(args, kit, target, c, out, probes)
    finally:
        procs.stop()
    rows = [normalise(json.loads(line)) for line in out.read_text().splitlines() if line.strip()]
    if probes.exists():
        seen = {(p["label"], p["C"]): p for p in map(json.loads, probes.read_text().splitlines())}
        for row in rows:
            row.update(seen.get((row["label"], row["C"]), {}))
    table = report(rows, targets)
    header = (
        f"# Gateway benchmark {stamp}: {args.tokens} tokens at {args.interval_ms:g} ms, "
        f"{args.duration:g} s per point, gateway workers {args.workers}\n\n"
        "Routers are compared with `direct` (the kit's fake backend, same HTTP load generator);\n"
        "`ours` with `replica` (its own backend, our fake-engine replica, driven over gRPC) and\n"
        "with `direct`. CPU us/chunk: CPU time of the target process (for baselines, of the\n"
        "backend itself) per streamed token; stack CPU us/chunk adds its backend's (a router's\n"
        "fake backend, the gateway's replica). Probe: `loadtest.ttft_probe`, one client in\n"
        "its own process sending one short request at a time over the same window, so its\n"
        "time to first token is the target's, not the load generator's own event loop.\n\n"
    )
    (RESULTS / f"bench_gateway-{stamp}.md").write_text(header + table + "\n")
    print(header + table)
    print(f"\n# results: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["grpc-loadgen"]:
        p = argparse.ArgumentParser(prog="bench_gateway grpc-loadgen")
        p.add_argument("--address", required=True)
        p.add_argument("-c", "--concurrency", type=int, default=1)
        p.add_argument("-d", "--duration", type=float, default=15.0)
        p.add_argument("--warmup", type=float, default=3.0)
        p.add_argument("--ramp", type=float, default=0.0)
        p.add_argument("--tokens", type=int, default=64)
        p.add_argument("--watch", action="append", default=[])
        p.add_argument("--json", required=True)
        p.add_argument("--label", default="replica")
        return run_grpc_loadgen(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_kit = os.environ.get("MSS_BENCH_KIT") or str(ROOT.parent / "shared" / "bench")
    default_work = os.environ.get("BENCH_WORK") or str(
        Path(os.environ.get("TMPDIR", "/tmp")) / "router-bench"
    )
    p.add_argument(
        "--bench-kit", default=default_kit, help="the bench kit folder (env MSS_BENCH_KIT)"
    )
    p.add_argument(
        "--bench-work", default=default_work, help="where setup_peers.sh installed the routers"
    )
    p.add_argument("--kit-python", default=None, help="python for the kit (default: its venv-base)")
    p.add_argument("--concurrency", default="1,64,256,1000")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        help="seconds over which each load generator opens its clients (0: all at once)",
    )
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--interval-ms", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    p.add_argument("--replica-streams", type=int, default=1, help="gateway streams per replica")
    p.add_argument("--loadgen-procs", type=int, default=1)
    p.add_argument("--only", default="", help="measure only these labels, e.g. replica,ours")
    p.add_argument(
        "--wait-quiet", type=float, default=0.0, help="wait up to S s for a quiet machine"
    )
    p.add_argument(
        "--no-probe",
        dest="probe",
        action="store_false",
        help="no idle client measuring time to first token beside the load generator",
    )
    return run_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
