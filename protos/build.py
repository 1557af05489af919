"""Regenerates the Python gRPC modules from the .proto files beside this file.

`python -m protos.build` writes them in place; `python -m protos.build --out DIR`
writes them under DIR instead (the staleness test compares the two).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent


def build(out: Path) -> None:
    """Generate `<name>_pb2.py`, `_pb2.pyi` and `_pb2_grpc.py` under out/protos/."""
    include = Path(protoc.__file__).resolve().parent / "_proto"
    (out / "protos").mkdir(parents=True, exist_ok=True)
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        rel = proto.relative_to(ROOT)
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{ROOT}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                str(rel),
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {rel} (exit {code})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    build(args.out.resolve())


if __name__ == "__main__":
    sys.exit(main())
