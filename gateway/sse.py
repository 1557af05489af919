"""Wire formats of the generation APIs; the lean streaming formats live here.

A route's format is chosen once per request (`make_format`), so the
per-token path never asks what the request wanted:

- `SeedFormat`: `/v1/chat/{model}`: `data: {"token": "...", "finished": false}`,
  then one `finished: true` event with the finish reason and usage.
- `ChatFormat` / `CompletionFormat`: OpenAI chunks of a streamed request that
  asks for nothing beyond text (one choice, no logprobs, no tools). Per-token
  work is one orjson call for the text and a byte concatenation: everything
  else in a chunk is encoded once per request into a prefix and a suffix.
- Everything else (n > 1, logprobs, tool calls, token ids, echo, continuous
  usage) and every whole (non-streamed) OpenAI body: `gateway.openai_stream`.

Chunks and bodies carry the fields vLLM's server sends, in its shapes (a
`null` field where vLLM writes one). An OpenAI stream that fails after it
started ends as vLLM's does: a `data:` event holding an error object, then
`data: [DONE]`; the seed route sends an `event: error`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.api_models import GenerationInput
from gateway.errors import error_object
from protos import replica_pb2

dumps = orjson.dumps
DONE = b"data: [DONE]\n\n"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def stop_reason(delta: replica_pb2.RequestDelta, stops: tuple[str, ...]) -> str | int | None:
    """vLLM's `stop_reason`: the stop string, or the stop token id as a number, or None (EOS)."""
    reason = delta.stop_reason
    if not reason:
        return None
    if reason not in stops and reason.isdigit():
        return int(reason)
    return reason


def error_event(payload: dict[str, Any]) -> bytes:
    return b"event: error\ndata: " + dumps(payload) + b"\n\n"


class StreamFormat:
    """How one API writes a generation; one instance per request.

    Lean formats (`lean` True) stream through `first`/`token`/`final`; the
    others through `feed`/`end`. Whole bodies are built from `add`ed deltas
    by `body`.
    """

    lean = True
    done = b""
    """Written after the last event (OpenAI's `[DONE]`)."""

    def __init__(
        self, request_id: str, model: str, inp: GenerationInput, fingerprint: str = ""
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.include_usage = inp.include_usage
        self.stops = tuple(inp.sampling.stop)
        self.fingerprint = fingerprint
        self.created = int(time.time())
        self.n = 1 if inp.output is None else inp.output.n
        self.finished = 0
        """Choices that have finished (the request is over when all have)."""

    def first(self) -> bytes:
        """Written before the first token."""
        return b""

    def token(self, text: str) -> bytes:
        raise NotImplementedError

    def final(self, finish: replica_pb2.RequestDelta) -> bytes:
        """The last delta of the request (its text too), usage and the end marker."""
        raise NotImplementedError

    def feed(self, delta: replica_pb2.RequestDelta) -> bytes:
        """Chunks for one delta (formats that are not lean)."""
        raise NotImplementedError

    def end(self, finish: replica_pb2.RequestDelta) -> bytes:
        """After the last choice finished: the usage chunk and the end marker."""
        raise NotImplementedError

    def error(self, message: str, status: int) -> bytes:
        """The event ending a stream that already started: vLLM's `data:` error, then [DONE]."""
        return b"data: " + dumps(error_object(message, status)) + b"\n\n" + DONE

    def add(self, delta: replica_pb2.RequestDelta) -> None:
        """Record a delta of a request answered as one body."""
        raise NotImplementedError

    def body(self, finish: replica_pb2.RequestDelta) -> dict[str, Any]:
        raise NotImplementedError

    def output_tokens(self, finish: replica_pb2.RequestDelta) -> int:
        """Output tokens of the request that `finish` ended (its usage count)."""
        return finish.completion_tokens


class SeedFormat(StreamFormat):
    _PREFIX = b'data: {"token":'
    _SUFFIX = b',"finished":false}\n\n'

    def __init__(
        self, request_id: str, model: str, inp: GenerationInput, fingerprint: str = ""
    ) -> None:
        super().__init__(request_id, model, inp, fingerprint)
        self._texts: list[str] = []

    def token(self, text: str) -> bytes:
        return self._PREFIX + dumps(text) + self._SUFFIX

    def final(self, finish: replica_pb2.RequestDelta) -> bytes:
        event = {
            "token": "",
            "finished": True,
            "finish_reason": finish.finish_reason,
            "usage": usage_dict(finish.prompt_tokens, finish.completion_tokens),
        }
        last = self.token(finish.text) if finish.text else b""
        return last + b"data: " + dumps(event) + b"\n\n"

    def error(self, message: str, status: int) -> bytes:
        payload = error_object(message, status)
        return error_event({**payload, "finished": True, "finish_reason": "error"})

    def add(self, delta: replica_pb2.RequestDelta) -> None:
        self._texts.append(delta.text)
        if delta.finish_reason:
            self.finished += 1

    def body(self, finish: replica_pb2.RequestDelta) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "model": self.model,
            "text": "".join(self._texts),
            "finished": True,
            "finish_reason": finish.finish_reason,
            "usage": usage_dict(finish.prompt_tokens, finish.completion_tokens),
        }


class _LeanOpenAIFormat(StreamFormat):
    done = DONE
    object_name = ""
    id_prefix = ""

    def __init__(
        self, request_id: str, model: str, inp: GenerationInput, fingerprint: str = ""
    ) -> None:
        super().__init__(request_id, model, inp, fingerprint)
        self.id = f"{self.id_prefix}{request_id}"
        self._head = (
            b'{"id":'
            + dumps(self.id)
            + b',"object":'
            + dumps(self.object_name)
            + b',"created":'
            + str(self.created).encode()
            + b',"model":'
            + dumps(model)
        )
        self._fingerprint = b',"system_fingerprint":' + dumps(fingerprint) if fingerprint else b""

    def _chunk(self, choice: bytes, tail: bytes = b"") -> bytes:
        return b"data: " + self._head + b',"choices":[' + choice + b"]" + tail + b"}\n\n"

    def _end(self, finish: replica_pb2.RequestDelta) -> bytes:
        if not self.include_usage:
            return DONE
        usage = usage_dict(finish.prompt_tokens, finish.completion_tokens)
        tail = b',"usage":' + dumps(usage) + self._fingerprint
        return self._chunk(b"", tail) + DONE

    def _final_tail(self) -> bytes:
        return b"" if self.include_usage else self._fingerprint


class ChatFormat(_LeanOpenAIFormat):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(
        self, request_id: str, model: str, inp: GenerationInput, fingerprint: str = ""
    ) -> None:
        super().__init__(request_id, model, inp, fingerprint)
        self._prefix = b"data: " + self._head + b',"choices":[{"index":0,"delta":{"content":'
        self._suffix = b'},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'

    def first(self) -> bytes:
        return self._chunk(
            b'{"index":0,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}',
            b',"prompt_token_ids":null,"prompt_text":null',
        )

    def token(self, text: str) -> bytes:
        return self._prefix + dumps(text) + self._suffix

    def final(self, finish: replica_pb2.RequestDelta) -> bytes:
        choice = {
            "index": 0,
            "delta": {"content": finish.text},
            "logprobs": None,
            "finish_reason": finish.finish_reason,
            "stop_reason": stop_reason(finish, self.stops),
            "token_ids": None,
        }
        return self._chunk(dumps(choice), self._final_tail()) + self._end(finish)


class CompletionFormat(_LeanOpenAIFormat):
    object_name = "text_completion"
    id_prefix = "cmpl-"

    def __init__(
        self, request_id: str, model: str, inp: GenerationInput, fingerprint: str = ""
    ) -> None:
        super().__init__(request_id, model, inp, fingerprint)
        self._prefix = b"data: " + self._head + b',"choices":[{"index":0,"text":'
        self._suffix = (
            b',"logprobs":null,"finish_reason":null,"stop_reason":null,'
            b'"prompt_token_ids":null,"token_ids":null}]}\n\n'
        )

    def token(self, text: str) -> bytes:
        return self._prefix + dumps(text) + self._suffix

    def final(self, finish: replica_pb2.RequestDelta) -> bytes:
        choice = {
            "index": 0,
            "text": finish.text,
            "logprobs": None,
            "finish_reason": finish.finish_reason,
            "stop_reason": stop_reason(finish, self.stops),
            "prompt_token_ids": None,
            "token_ids": None,
        }
        return self._chunk(dumps(choice), self._final_tail()) + self._end(finish)
