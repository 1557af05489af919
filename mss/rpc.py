"""gRPC settings and status codes shared by every role: one home for each.

Clients and servers of the same link must agree on keepalive (a client that
pings more often than its server permits is sent GOAWAY), so both sides are
defined here side by side. Channels reconnect within a second instead of
gRPC's default backoff of up to two minutes: a scheduler that waited that long
after a controller restart would be declared dead, and a gateway would keep a
restarted replica out of rotation.
"""

from __future__ import annotations

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message either way; a replica reply carries one step of many streams."""

_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]

KEEPALIVE_TIME_MS = 500
KEEPALIVE_TIMEOUT_MS = 500
"""Long-lived streams ping their server every half second and give up on a peer that
has not answered within another half second: a replica or controller
whose host is cut off is noticed in about a second, even while a stream waits for its
next message, and a gateway's streams on it move to another replica. Measured with
`python -m loadtest.fault_run` (a node's link cut under 16-24 streaming clients, fake
engine, a shared 2-core machine): the longest pause of a moved stream was 2.0-2.1 s
with 1 s / 1 s, 0.9-1.4 s with 0.5 s / 0.5 s, and 0.5-0.9 s with 0.25 s / 0.25 s.
Pings are answered by gRPC's own threads, so a busy peer still answers; but a peer
whose machine stalls longer than the timeout, or a network hiccup as long, drops the
connection (gRPC also sets TCP_USER_TIMEOUT to it), and its streams move and its
replica leaves the rotation until a probe succeeds. Half a second keeps that rare on
a loaded machine; a quarter would not. A ping is a few dozen bytes."""

_CLIENT_KEEPALIVE = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Clients ping every half second; permit twice that rate, and never answer a client that
    # pings too often with GOAWAY (which would break every stream on the connection).
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
]
"""Every gRPC server: the controller's and each replica's."""

WATCH_CHANNEL_OPTIONS: list[tuple[str, int]] = _CLIENT_KEEPALIVE + _FAST_RECONNECT
"""Long-lived calls that must notice a dead peer: a gateway watching routes."""

STREAM_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    *_CLIENT_KEEPALIVE,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 64 * 1024),
]
"""A gateway's Generate streams to a replica: large messages, keepalive, quick reconnect,
and a fixed 64 KiB window for replies (no bandwidth probing, which grew it to megabytes):
under load a replica's replies then wait in the replica, where the next one takes in
more steps, instead of queuing in the connection behind each other."""

UNARY_CHANNEL_OPTIONS: list[tuple[str, int]] = list(_FAST_RECONNECT)
"""Short calls with their own deadlines: heartbeats, Health probes, admin calls."""


def status_code(number: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` whose wire number is `number` (UNKNOWN when none is)."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def status_name(number: int) -> str:
    """Lower-case name of a status number, as used in metric labels and error codes."""
    return status_code(number).name.lower()


def status_number(code: grpc.StatusCode) -> int:
    """The wire number of `code` (what `grpc.aio` hands back as `code().value[0]`)."""
    return int(code.value[0])


_CODES: dict[int, grpc.StatusCode] = {int(c.value[0]): c for c in grpc.StatusCode}
