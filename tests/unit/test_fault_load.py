"""The fault run's clients judge answers right: an error event is a cut stream on every
route, texts are gathered from each format, and a phase's row counts and times them.

Answers come from an in-memory transport with fixed SSE bodies, as the gateway
writes them.
"""

from __future__ import annotations

import httpx
import pytest

from loadtest import fault_cluster
from loadtest.fault_cluster import Record, percentile, summarize

SEED_OK = (
    b'data: {"token":"the","finished":false}\n\n'
    b'data: {"token":" fox","finished":false}\n\n'
    b'data: {"token":"","finished":true,"finish_reason":"length"}\n\n'
)
SEED_ERROR = (
    b'data: {"token":"the","finished":false}\n\n'
    b'event: error\ndata: {"error":{"message":"replica failed"},"finished":true,'
    b'"finish_reason":"error"}\n\n'
)
COMPLETION_OK = (
    b'data: {"choices":[{"index":0,"text":"the"}]}\n\n'
    b'data: {"choices":[{"index":0,"text":" fox","finish_reason":"length"}]}\n\n'
    b"data: [DONE]\n\n"
)
CHAT_ERROR = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"the"}}]}\n\n'
    b'data: {"error":{"message":"replica failed","code":503}}\n\n'
    b"data: [DONE]\n\n"
)


def answering(body: bytes, status: int = 200) -> httpx.AsyncClient:
    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body)

    return httpx.AsyncClient(base_url="http://gateway", transport=httpx.MockTransport(reply))


@pytest.mark.parametrize(("kind", "body"), [("seed", SEED_OK), ("completion", COMPLETION_OK)])
async def test_a_stream_text_is_its_pieces_with_their_timing(kind: str, body: bytes) -> None:
    record = Record("p", kind, 0.0)
    async with answering(body) as http:
        assert await fault_cluster._stream(http, kind, "hi", record) == "the fox"
    assert record.ttft is not None and len(record.gaps) == 1
    assert record.stall >= record.ttft


@pytest.mark.parametrize(("kind", "body"), [("seed", SEED_ERROR), ("chat", CHAT_ERROR)])
async def test_an_error_event_is_a_cut_stream(kind: str, body: bytes) -> None:
    async with answering(body) as http:
        with pytest.raises(fault_cluster._Cut):
            await fault_cluster._stream(http, kind, "hi", Record("p", kind, 0.0))


async def test_an_http_failure_is_a_cut_stream() -> None:
    async with answering(b'{"error":{"message":"no replica"}}', status=503) as http:
        with pytest.raises(fault_cluster._Cut, match="503"):
            await fault_cluster._stream(http, "seed", "hi", Record("p", "seed", 0.0))


def test_a_phase_row_counts_outcomes_and_times_streams_only() -> None:
    records = [
        Record("a", "seed", 0.0, ttft=0.05, gaps=[0.02, 0.9], stall=0.9, outcome="ok"),
        Record("a", "chat_body", 0.0, outcome="ok"),
        Record("a", "seed", 0.0, ttft=0.03, gaps=[0.02], stall=0.03, outcome="wrong"),
        Record("b", "seed", 0.0, ttft=9.0, stall=9.0, outcome="cut"),
    ]
    row = summarize("a", records, {"moved": 1.0})
    assert (row["requests"], row["ok"], row["wrong"], row["cut"], row["hung"]) == (3, 2, 1, 0, 0)
    assert row["ttft_p50_ms"] == pytest.approx(30) and row["max_stall_s"] == 0.9
    assert row["itl_p99_ms"] == pytest.approx(900) and row["moved"] == 1.0
    assert row["failures"] == ["seed: wrong: "]


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
        50.0,
        99.0,
        100.0,
    )
    assert percentile([], 50) is None
