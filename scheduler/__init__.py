"""Node scheduler: runs and supervises the replicas the controller assigns to its node."""

import os

# Replicas are started with fork+exec while gRPC threads run; gRPC's fork
# handlers are useless there and only log a warning at every start.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
