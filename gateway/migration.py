"""Moving a request whose replica failed after output began to another replica.

The request goes on as a continuation: the same prompt and sampling, followed by
the token ids it has produced so far (`GenerateRequest.resume`), with its token
bounds reduced by them. `GenerationService._migrate` decides when; this module
holds what it needs: which requests can move, how the continuation is built
and which replica takes it (another host first).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from gateway.api_models import GenerationInput
from gateway.replica_client import Output, ReplicaClient
from gateway.routing_table import ModelRouter
from mss.rpc import status_number
from protos import replica_pb2

MIGRATABLE = {
    status_number(code)
    for code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
}
"""Failures after output began that are the replica's, not the request's: it moves on."""
MAX_MIGRATIONS = 3
"""Replicas a request may move to after its first one."""
MIGRATION_WAIT_S = 10.0
"""How long a request whose replica failed waits for another to be ready, in all."""
MIGRATION_POLL_S = 0.05


def migratable(inp: GenerationInput) -> bool:
    """Whether a request can continue on another replica from its token ids: one choice
    (each choice would need its own continuation) and no structured output (the
    constraint's state does not survive the move)."""
    return max(1, inp.sampling.n) == 1 and not inp.sampling.HasField("structured")


def continuation(
    request: replica_pb2.GenerateRequest, output: Output, request_id: str
) -> replica_pb2.GenerateRequest:
    """`request` continued after `output`: the same prompt and sampling, the produced tokens
    to resume from, and the token bounds reduced by what was produced."""
    produced = len(output.token_ids)
    cont = replica_pb2.GenerateRequest()
    cont.CopyFrom(request)
    cont.request_id = request_id
    if request.sampling.max_tokens:  # 0 is "as many as fit", whatever came before
        cont.sampling.max_tokens = request.sampling.max_tokens - produced
    cont.sampling.min_tokens = max(0, request.sampling.min_tokens - produced)
    cont.sampling.ClearField("prompt_logprobs")  # sent with the first output already
    cont.resume.token_ids.extend(output.token_ids)
    if output.count_text:
        cont.resume.text_chars = output.text_chars
    return cont


def still_failing(router: ModelRouter, failed: set[str]) -> set[str]:
    """Of the replicas that failed a request, those not back in rotation with a clean record."""
    out = set()
    for replica_id in failed:
        client = router.clients.get(replica_id)
        if client is None or not client.stats.healthy or client.failures:
            out.add(replica_id)
    return out


def host_of(client: ReplicaClient) -> str:
    return client.address.rsplit(":", 1)[0]


def pick_elsewhere(
    router: ModelRouter,
    key: str | None,
    avoid: set[str],
    failed: set[str],
    blocks: Sequence[int] = (),
) -> ReplicaClient | None:
    """A replica for a request that `failed` replicas could not serve, on another host than
    theirs while one has room, else any not in `avoid`.

    A host cut off from the network takes all its replicas with it, and each is
    noticed only when its own connection's keepalive fails: a request moved to a
    neighbour of the first would stall a second time.
    """
    if not failed:
        return router.pick(key, avoid, blocks)
    hosts = {host_of(c) for rid in failed if (c := router.clients.get(rid)) is not None}
    neighbours = {rid for rid, c in router.clients.items() if host_of(c) in hosts}
    return router.pick(key, avoid | neighbours, blocks) or router.pick(key, avoid, blocks)
