"""Shared pieces of the serving system: configuration, logging and the `mss` command."""
