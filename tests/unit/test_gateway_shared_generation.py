"""What makes a request cacheable, its key, Cache-Control, and the replay of an entry."""

from __future__ import annotations

import asyncio

from gateway.shared_generation import (
    cache_directives,
    deterministic,
    encode,
    replay_sink,
    request_key,
)
from protos import replica_pb2


def _request(request_id: str = "a", **sampling: object) -> replica_pb2.GenerateRequest:
    req = replica_pb2.GenerateRequest(request_id=request_id, prompt="hello")
    for name, value in sampling.items():
        setattr(req.sampling, name, value)
    return req


def test_greedy_or_seeded_is_deterministic() -> None:
    assert deterministic(_request(temperature=0.0).sampling)
    assert deterministic(_request(temperature=0.9, seed=3).sampling)
    assert deterministic(_request(seed=0).sampling)
    assert not deterministic(_request().sampling)  # the engine's default temperature
    assert not deterministic(_request(temperature=0.5).sampling)


def test_key_covers_the_request_but_not_its_id() -> None:
    base = request_key("m", _request("a", temperature=0.0, max_tokens=8))
    assert request_key("m", _request("b", temperature=0.0, max_tokens=8)) == base
    assert request_key("other", _request("a", temperature=0.0, max_tokens=8)) != base
    assert request_key("m", _request("a", temperature=0.0, max_tokens=9)) != base
    assert request_key("m", _request("a", temperature=0.0, max_tokens=8, top_k=5)) != base
    changed = _request("a", temperature=0.0, max_tokens=8)
    changed.prompt = "hello!"
    assert request_key("m", changed) != base


def test_cache_control() -> None:
    assert cache_directives([]) == (True, True)
    assert cache_directives([(b"cache-control", b"no-cache")]) == (False, True)
    assert cache_directives([(b"cache-control", b"max-age = 0")]) == (False, True)
    assert cache_directives([(b"cache-control", b"private, no-store")]) == (False, False)
    assert cache_directives([(b"cache-control", b"max-age=60")]) == (True, True)
    assert cache_directives([(b"x-other", b"no-store")]) == (True, True)


def test_replay_holds_every_delta_and_has_ended() -> None:
    deltas = [
        replica_pb2.RequestDelta(request_id="x", text=f"t{i}", num_tokens=1, token_ids=[i])
        for i in range(600)  # beyond any stream buffer
    ]
    deltas.append(
        replica_pb2.RequestDelta(
            request_id="x", finish_reason="stop", prompt_tokens=3, completion_tokens=600
        )
    )

    async def main() -> None:
        sink = replay_sink(encode(deltas), "new-id", 1)
        assert sink is not None
        assert sink.ended and not sink.overflowed
        got = sink.take()
        assert [d.text for d in got] == [d.text for d in deltas]
        assert got[-1].completion_tokens == 600
        assert replay_sink(b"\xff\xffnot a message", "y", 1) is None
        assert replay_sink(encode(deltas[:5]), "y", 1) is None  # unfinished: never replayed

    asyncio.run(main())
