"""A small multiplexing client of the replica's Generate stream, for tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from protos import replica_pb2, replica_pb2_grpc


@dataclass
class Result:
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_code: int = 0
    error_message: str = ""
    deltas: int = 0
    tokens: int = 0
    loads: list[replica_pb2.Load] = field(default_factory=list)


class StreamClient:
    """One Generate stream; `run()` sends a request and collects its result."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = replica_pb2_grpc.ReplicaStub(self.channel)
        self.outgoing: asyncio.Queue[replica_pb2.GenerateClientMessage | None] = asyncio.Queue()
        self.waiters: dict[str, asyncio.Queue[replica_pb2.RequestDelta]] = {}
        self.replies = 0
        self.call = self.stub.Generate(self._messages())
        self.reader = asyncio.create_task(self._read())

    async def _messages(self) -> AsyncIterator[replica_pb2.GenerateClientMessage]:
        while (message := await self.outgoing.get()) is not None:
            yield message

    async def _read(self) -> None:
        async for reply in self.call:
            self.replies += 1
            for delta in reply.deltas:
                queue = self.waiters.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
                    self.last_load = reply.load

    def send(self, request: replica_pb2.GenerateRequest) -> asyncio.Queue[replica_pb2.RequestDelta]:
        queue: asyncio.Queue[replica_pb2.RequestDelta] = asyncio.Queue()
        self.waiters[request.request_id] = queue
        self.outgoing.put_nowait(replica_pb2.GenerateClientMessage(request=request))
        return queue

    def cancel(self, request_id: str) -> None:
        self.outgoing.put_nowait(
            replica_pb2.GenerateClientMessage(
                cancel=replica_pb2.CancelRequest(request_id=request_id)
            )
        )

    async def run(self, request: replica_pb2.GenerateRequest, timeout: float = 120) -> Result:
        queue = self.send(request)
        result = Result()
        async with asyncio.timeout(timeout):
            while True:
                delta = await queue.get()
                result.text += delta.text
                result.deltas += 1
                result.tokens += delta.num_tokens
                if delta.finish_reason:
                    result.finish_reason = delta.finish_reason
                    result.prompt_tokens = delta.prompt_tokens
                    result.completion_tokens = delta.completion_tokens
                    result.error_code = delta.error.code
                    result.error_message = delta.error.message
                    return result

    async def health(self) -> replica_pb2.HealthResponse:
        return await self.stub.Health(replica_pb2.HealthRequest(), timeout=5)

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        try:
            await asyncio.wait_for(self.reader, 10)
        except (TimeoutError, grpc.aio.AioRpcError):
            self.reader.cancel()
        await self.channel.close()


def chat(request_id: str, content: str, **kwargs: object) -> replica_pb2.GenerateRequest:
    return replica_pb2.GenerateRequest(
        request_id=request_id,
        messages=[replica_pb2.ChatMessage(role="user", content=content)],
        **kwargs,  # type: ignore[arg-type]
    )
