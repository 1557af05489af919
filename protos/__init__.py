"""Generated gRPC code for the wire contract in `*.proto` (see `python -m protos.build`)."""
