"""What the gateway holds for one request in progress: the client's side (`Flow`) and the
replica's (`Lease`), and the wire request built from the parsed one.

`gateway.generation` runs requests with them; `gateway.shared_generation` reads
them too (a cached or shared generation is written to its clients the same way).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.api_models import GenerationInput
from gateway.rate_limits import KeyLimiter
from gateway.replica_client import Output, ReplicaClient, RequestSink
from gateway.sse import StreamFormat
from protos import replica_pb2


class ClientGone(Exception):
    """The client disconnected (or was dropped) before its response ended."""


@dataclass(slots=True)
class GenerationRequest:
    """A request read and checked by `Gateway.serve`, ready for its model's replicas."""

    inp: GenerationInput
    max_tokens: int
    """Bounded by the model's limit already."""
    fmt: StreamFormat
    """The route's wire format; its `request_id` is echoed as X-Request-Id."""
    client_key: str
    """Whose concurrency limit the request counts against: `key:<key id>` or the address."""
    key: KeyLimiter | None = None
    """The API key's limits, when the request came with a key."""


@dataclass(eq=False, slots=True)
class Flow:
    """A request in progress as the disconnect watcher and slow-client watchdog see it."""

    model: str
    transport: Any = None
    write_now: Callable[[bytes], bool] | None = None
    """The connection's synchronous write of a stream chunk (`GatewayCycle.write_now`);
    None where the server is not the gateway's own (in-process test clients)."""
    task: asyncio.Task[Any] | None = None
    sink: RequestSink | None = None
    gone: bool = False
    dropped: bool = False
    send_started: float = 0.0
    """Loop time a blocked body write began; 0 when no write is pending."""
    charge: int = 0
    """Output tokens to charge to the API key: the usage count once the request finished;
    before that, from the first token on, the most it may produce (so a client cannot
    dodge its budget by leaving before the usage count arrives)."""
    gone_event: asyncio.Event = field(default_factory=asyncio.Event)

    def leave(self) -> None:
        self.gone = True
        self.gone_event.set()
        if self.sink is not None:
            self.sink.wake()


def build_request(
    inp: GenerationInput, request_id: str, max_tokens: int
) -> replica_pb2.GenerateRequest:
    """The wire request: the record's prompt or messages and its sampling, max_tokens bounded."""
    req = replica_pb2.GenerateRequest(
        request_id=request_id,
        prompt=inp.prompt,
        prompt_token_ids=inp.prompt_token_ids,
        messages=inp.messages,
        sampling=inp.sampling,
        tools_json=inp.tools_json,
    )
    req.sampling.max_tokens = max_tokens
    if inp.chat_template is not None:
        req.chat_template.CopyFrom(inp.chat_template)
    return req


@dataclass(slots=True)
class Lease:
    """The replica serving a request now, and what moving it elsewhere needs."""

    client: ReplicaClient | None
    """None once released for good (a migration found no replica)."""
    sink: RequestSink
    request: replica_pb2.GenerateRequest
    """The wire request as first sent; continuations are built from it."""
    output: Output | None
    """What the request has produced, when it may migrate (one choice, free text)."""
    session_key: str | None
    migrations: int = 0
    waited: float = 0.0
    """Seconds spent waiting for a replica to move to."""
    exclude: set[str] = field(default_factory=set)
    """Replicas that failed this request."""
    blocks: Sequence[int] = ()
    """The prompt's block hashes, for a strategy that routes by them (`ModelRouter.pick`)."""

    def release(self) -> bool:
        """Give the request's replica slot back; True when it had not ended (an abort)."""
        client = self.client
        if client is None:
            return False
        self.client = None
        aborted = not self.sink.ended
        client.release(self.sink)
        return aborted


def request_charge(request: replica_pb2.GenerateRequest) -> int:
    """The most output tokens a request may produce: charged until its usage is known."""
    return request.sampling.max_tokens * max(1, request.sampling.n)
