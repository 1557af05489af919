"""Time to first token as one idle client sees it, beside a load generator.

A closed-loop load generator with hundreds of clients in one Python process
measures its own event loop too: at 256 streams of 100 tokens a second each,
the first token of a new request waits in that process behind the tokens of
every other stream it is parsing, so the time to first token it reports grows
with how much of the machine the target leaves it. This probe runs in its
own process and sends one small streaming chat request at a time (two
tokens, a short pause between requests), so what it measures is the
target's time from a request sent to its first content token.

    python -m loadtest.ttft_probe --url http://127.0.0.1:8000 --model M \\
        --delay 3 --duration 15 --json probe.jsonl --label ours -c 256

One JSON line per run: the label, C, how many requests, their errors and the
time to first token's p50, p90 and p99 in ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from urllib.parse import urlsplit

from loadtest.bench_gateway import pct

PAUSE_S = 0.05
"""Between two requests of the probe: it stays a light load of its own."""


def first_token_ms(conn: http.client.HTTPConnection, body: bytes) -> float:
    """Send one streaming chat request; ms until the first delta with content. The rest of
    the stream is read to its end so the connection can be used again."""
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first: float | None = None
    while line := response.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        if first is None:
            choices = json.loads(line[6:]).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                first = (time.perf_counter() - start) * 1000
    response.read()
    if first is None:
        raise RuntimeError("the stream ended without a token")
    return first


def run(args: argparse.Namespace) -> dict[str, object]:
    target = urlsplit(args.url)
    body = json.dumps(
        {
            "model": args.model,
            "messages": [{"role": "user", "content": "probe"}],
            "max_tokens": 2,
            "stream": True,
        }
    ).encode()
    time.sleep(args.delay)
    end = time.monotonic() + args.duration
    times: list[float] = []
    errors: list[str] = []
    conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=30)
    while time.monotonic() < end:
        try:
            times.append(first_token_ms(conn, body))
        except (OSError, http.client.HTTPException, RuntimeError, ValueError) as exc:
            errors.append(repr(exc)[:200])
            conn.close()
            conn = http.client.HTTPConnection(
                target.hostname or "127.0.0.1", target.port, timeout=30
            )
        time.sleep(PAUSE_S)
    conn.close()
    times.sort()
    return {
        "label": args.label,
        "C": args.concurrency,
        "probe_n": len(times),
        "probe_errors": len(errors),
        "probe_ttft_ms": {str(p): pct(times, p) for p in (50, 90, 99)},
        "probe_error_samples": errors[:3],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--delay", type=float, default=0.0, help="seconds to wait before the first")
    p.add_argument("-d", "--duration", type=float, default=15.0)
    p.add_argument("-c", "--concurrency", type=int, default=0, help="the load beside, recorded")
    p.add_argument("--label", default="target")
    p.add_argument("--json", required=True, help="file the result line is appended to")
    args = p.parse_args(argv)
    result = run(args)
    with open(args.json, "a") as out:
        out.write(json.dumps(result) + "\n")
    ttft = result["probe_ttft_ms"]
    assert isinstance(ttft, dict)
    print(
        f"[{args.label} probe] C={args.concurrency} n={result['probe_n']} "
        f"errors={result['probe_errors']} TTFT ms p50/p90/p99 = "
        f"{ttft['50']:.1f}/{ttft['90']:.1f}/{ttft['99']:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
