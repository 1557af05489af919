"""The test suite. Its in-process gRPC clients and servers run with the same
gRPC settings as the `mss` command gives every role; gRPC reads them when it
is first imported, which is after this package."""

import os

from mss.cli import GRPC_EXPERIMENTS

os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
