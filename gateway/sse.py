"""Wire formats of the three generation APIs: SSE events and whole JSON bodies.

Per-token work is one orjson call for the token string and a byte
concatenation: everything else in an event (id, model, created, the JSON
around the text) is encoded once per request into a prefix and a suffix.

- `SeedFormat`: `/v1/chat/{model}`: `data: {"token": "...", "finished": false}`,
  then one `finished: true` event with the finish reason and usage.
- `ChatFormat` / `CompletionFormat`: OpenAI chunk objects, `data: [DONE]` last.
Errors after the stream started are an `event: error` whose data holds an
OpenAI-shaped `error` object (`gateway.errors.error_object`), which the
`openai` package raises as APIError.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.errors import error_object

dumps = orjson.dumps
DONE = b"data: [DONE]\n\n"
OPENAI_FINISH = {"stop": "stop", "length": "length", "abort": "stop", "error": "stop"}


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


UPSTREAM_ERROR = "upstream_error"
"""OpenAI error type of a generation that failed after its stream started."""


def error_event(payload: dict[str, Any]) -> bytes:
    return b"event: error\ndata: " + dumps(payload) + b"\n\n"


class StreamFormat:
    """How one API writes a generation; one instance per request."""

    done = b""
    """Written after the last event (OpenAI's `[DONE]`)."""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())

    def first(self) -> bytes:
        """Written before the first token."""
        return b""

    def token(self, text: str) -> bytes:
        raise NotImplementedError

    def final(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        raise NotImplementedError

    def error(self, message: str, code: str | None = None) -> bytes:
        """An `event: error` ending a stream that already started."""
        return error_event(error_object(message, UPSTREAM_ERROR, code=code))

    def whole(
        self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        raise NotImplementedError


class SeedFormat(StreamFormat):
    _PREFIX = b'data: {"token":'
    _SUFFIX = b',"finished":false}\n\n'

    def token(self, text: str) -> bytes:
        return self._PREFIX + dumps(text) + self._SUFFIX

    def final(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        event = {
            "token": "",
            "finished": True,
            "finish_reason": finish_reason,
            "usage": usage_dict(prompt_tokens, completion_tokens),
        }
        return b"data: " + dumps(event) + b"\n\n"

    def error(self, message: str, code: str | None = None) -> bytes:
        payload = error_object(message, UPSTREAM_ERROR, code=code)
        return error_event({**payload, "finished": True, "finish_reason": "error"})

    def whole(
        self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "model": self.model,
            "text": text,
            "finished": True,
            "finish_reason": finish_reason,
            "usage": usage_dict(prompt_tokens, completion_tokens),
        }


class _OpenAIFormat(StreamFormat):
    done = DONE
    object_name = ""
    id_prefix = ""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        super().__init__(request_id, model, include_usage)
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

    def _chunk(self, choice: bytes, usage: bytes = b"") -> bytes:
        return b"data: " + self._head + b',"choices":[' + choice + b"]" + usage + b"}\n\n"

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return (
            b"data: "
            + self._head
            + b',"choices":[],"usage":'
            + dumps(usage_dict(prompt_tokens, completion_tokens))
            + b"}\n\n"
        )


class ChatFormat(_OpenAIFormat):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        super().__init__(request_id, model, include_usage)
        self._prefix = b"data: " + self._head + b',"choices":[{"index":0,"delta":{"content":'
        self._suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def first(self) -> bytes:
        return self._chunk(
            b'{"index":0,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}'
        )

    def token(self, text: str) -> bytes:
        return self._prefix + dumps(text) + self._suffix

    def final(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        reason = dumps(OPENAI_FINISH.get(finish_reason, finish_reason))
        out = self._chunk(b'{"index":0,"delta":{},"logprobs":null,"finish_reason":' + reason + b"}")
        if self.include_usage:
            out += self._usage(prompt_tokens, completion_tokens)
        return out

    def whole(
        self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": OPENAI_FINISH.get(finish_reason, finish_reason),
                }
            ],
            "usage": usage_dict(prompt_tokens, completion_tokens),
        }


class CompletionFormat(_OpenAIFormat):
    object_name = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        super().__init__(request_id, model, include_usage)
        self._prefix = b"data: " + self._head + b',"choices":[{"index":0,"text":'
        self._suffix = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def token(self, text: str) -> bytes:
        return self._prefix + dumps(text) + self._suffix

    def final(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        reason = dumps(OPENAI_FINISH.get(finish_reason, finish_reason))
        out = self._chunk(b'{"index":0,"text":"","logprobs":null,"finish_reason":' + reason + b"}")
        if self.include_usage:
            out += self._usage(prompt_tokens, completion_tokens)
        return out

    def whole(
        self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": OPENAI_FINISH.get(finish_reason, finish_reason),
                }
            ],
            "usage": usage_dict(prompt_tokens, completion_tokens),
        }
