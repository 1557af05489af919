"""The committed gRPC modules match what the .proto files generate."""

from __future__ import annotations

from pathlib import Path

from protos.build import PROTO_DIR, build


def test_generated_code_is_current(tmp_path: Path) -> None:
    build(tmp_path)
    generated = sorted((tmp_path / "protos").glob("*_pb2*.py*"))
    assert generated, "protoc produced nothing"
    for fresh in generated:
        committed = PROTO_DIR / fresh.name
        assert committed.exists(), f"{fresh.name} is not committed; run `make protos`"
        assert committed.read_text() == fresh.read_text(), (
            f"{fresh.name} is stale; run `make protos`"
        )
