"""OpenAI responses with extras: n choices, logprobs, tool calls, token ids, echo,
continuous usage; and every whole (non-streamed) OpenAI body.

One format object per request. Streaming, `feed` turns each replica delta
into chunks as vLLM's server writes them (one chunk per choice per step, so
n choices interleave by `index`; a role chunk per choice first); the request
is over when all n choices finished, and `end` writes the usage chunk and
`[DONE]`. Not streaming, `add` records deltas and `body` builds the one JSON
body. Shapes follow vLLM 0.32's `ChatCompletionStreamResponse`,
`ChatCompletionResponse`, `CompletionStreamResponse` and
`CompletionResponse`, including the `null` fields they write.

Logprobs: the replica sends, per token, the chosen token and the most likely
alternatives. vLLM's objects list the chosen token first, then the others:
chat takes the first `top_logprobs` of that list; completions map the first
`logprobs` + 1 (token -> logprob); logprobs are clamped at -9999.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from gateway.api_models import GenerationInput, OutputOptions
from gateway.sse import DONE, StreamFormat, stop_reason, usage_dict
from gateway.tool_calls import ToolCallStream, parse_named, parse_required
from protos import replica_pb2

dumps = orjson.dumps
MIN_LOGPROB = -9999.0
TokenLogprob = replica_pb2.TokenLogprob


class _Choice:
    """What one choice has produced so far."""

    __slots__ = (
        "done",
        "echoed",
        "finish_reason",
        "index",
        "logprobs",
        "offset",
        "stop_reason",
        "texts",
        "token_ids",
        "tokens",
        "tools",
    )

    def __init__(self, index: int, tools: ToolCallStream | None) -> None:
        self.index = index
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.tokens = 0
        self.finish_reason = ""
        self.stop_reason: str | int | None = None
        self.done = False
        self.echoed = False
        self.offset = 0
        """Completions: text offset of the next logprob token."""
        self.tools = tools


def _token(entry: TokenLogprob | replica_pb2.TopLogprob, as_ids: bool) -> str:
    return f"token_id:{entry.token_id}" if as_ids else entry.token


def _ranked(entry: TokenLogprob) -> list[replica_pb2.TopLogprob | TokenLogprob]:
    """The chosen token, then the alternatives that are not it (vLLM's order)."""
    return [entry, *(t for t in entry.top if t.token_id != entry.token_id)]


def _logprob(entry: TokenLogprob | replica_pb2.TopLogprob) -> float:
    return max(entry.logprob, MIN_LOGPROB)


def prompt_logprobs(entries: Sequence[TokenLogprob]) -> list[dict[str, Any] | None]:
    """A completion choice's `prompt_logprobs` as vLLM's server writes it: per prompt
    token, None where there is no logprob (the first), else `{token_id: {logprob, rank,
    decoded_token}}` for the token and its alternatives, in the engine's order."""
    out: list[dict[str, Any] | None] = []
    for e in entries:
        if not e.has_logprob:
            out.append(None)
            continue
        alternatives = e.top or [e]
        out.append(
            {
                str(a.token_id): {"logprob": _logprob(a), "rank": a.rank, "decoded_token": a.token}
                for a in alternatives
            }
        )
    return out


def chat_logprobs(
    entries: Sequence[TokenLogprob], top: int, as_ids: bool
) -> dict[str, list[dict[str, Any]]]:
    """Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    content = []
    for e in entries:
        ranked = _ranked(e)
        alternatives = ranked if top < 0 else ranked[:top]
        content.append(
            {
                "token": _token(e, as_ids),
                "logprob": _logprob(e) if e.has_logprob else MIN_LOGPROB,
                "bytes": list(e.token.encode("utf-8", errors="replace")),
                "top_logprobs": [
                    {
                        "token": (tok := _token(t, as_ids)),
                        "logprob": _logprob(t),
                        "bytes": list(tok.encode("utf-8", errors="replace")),
                    }
                    for t in alternatives
                ],
            }
        )
    return {"content": content}


def completion_logprobs(
    entries: Sequence[TokenLogprob], top: int, as_ids: bool, offset: int = 0
) -> dict[str, list[Any]]:
    """Completions' `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for e in entries:
        token = _token(e, as_ids)
        offsets.append(offset)
        offset += len(token)
        tokens.append(token)
        if not e.has_logprob:
            values.append(None)
            tops.append(None)
            continue
        values.append(_logprob(e))
        ranked = _ranked(e)
        if top >= 0:
            ranked = ranked[: top + 1]
        tops.append({_token(t, as_ids): _logprob(t) for t in ranked})
    return {
        "text_offset": offsets,
        "token_logprobs": values,
        "tokens": tokens,
        "top_logprobs": tops,
    }


class _RichFormat(StreamFormat):
    lean = False
    done = DONE
    object_name = ""
    id_prefix = ""

    def __init__(
        self, request_id: str, model: str, inp: GenerationInput, fingerprint: str = ""
    ) -> None:
        super().__init__(request_id, model, inp, fingerprint)
        self.out = out = inp.output or OutputOptions()
        self.id = f"{self.id_prefix}{request_id}"
        self.choices = [_Choice(i, self._tool_stream(out)) for i in range(out.n)]
        self.prompt_ids: list[int] = []
        self.prompt_logprobs: list[TokenLogprob] = []
        self.prompt_tokens = 0
        self.started = False

    @staticmethod
    def _tool_stream(out: OutputOptions) -> ToolCallStream | None:
        if out.tool_choice == "none":
            return None
        return ToolCallStream(out.tool_choice, out.tool_name, out.parallel_tool_calls)

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return b"data: " + dumps(chunk) + b"\n\n"

    def _prompt(self, d: replica_pb2.RequestDelta) -> None:
        if d.prompt_token_ids:
            self.prompt_ids = list(d.prompt_token_ids)
            self.prompt_tokens = len(self.prompt_ids)
        if d.prompt_logprobs:
            self.prompt_logprobs = list(d.prompt_logprobs)
        if d.prompt_tokens:
            self.prompt_tokens = d.prompt_tokens

    def _choice(self, d: replica_pb2.RequestDelta) -> _Choice | None:
        if d.prompt_token_ids or d.prompt_logprobs or d.prompt_tokens:
            self._prompt(d)
        if not 0 <= d.index < len(self.choices):
            return None
        c = self.choices[d.index]
        if c.done:
            return None
        if d.finish_reason:
            c.done = True
            c.finish_reason = d.finish_reason
            c.stop_reason = stop_reason(d, self.stops)
            self.finished += 1
        return c

    def _usage(self, tokens: int, details: bool = False) -> dict[str, Any]:
        usage: dict[str, Any] = usage_dict(self.prompt_tokens, tokens)
        if details:
            usage["completion_tokens_details"] = None
        return usage

    def output_tokens(self, finish: replica_pb2.RequestDelta) -> int:
        """The usage count, or the choices' tokens when the request ended on a delta before
        the one carrying it (every choice had finished)."""
        return finish.completion_tokens or sum(c.tokens for c in self.choices)

    def end(self, finish: replica_pb2.RequestDelta) -> bytes:
        if not self.include_usage:
            return DONE
        prompt = finish.prompt_tokens or self.prompt_tokens
        completion = self.output_tokens(finish)
        extra: dict[str, Any] = {"usage": usage_dict(prompt, completion)}
        if self.fingerprint:
            extra["system_fingerprint"] = self.fingerprint
        return self._chunk([], **extra) + DONE

    def _finish_extra(self, c: _Choice) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if c.done and not self.include_usage and self.fingerprint:
            extra["system_fingerprint"] = self.fingerprint
        return extra

    def add(self, delta: replica_pb2.RequestDelta) -> None:
        c = self._choice(delta)
        if c is None:
            return
        c.texts.append(delta.text)
        c.token_ids.extend(delta.token_ids)
        c.logprobs.extend(delta.logprobs)
        c.tokens += delta.num_tokens

    def _body(
        self, finish: replica_pb2.RequestDelta, choices: list[dict[str, Any]]
    ) -> dict[str, Any]:
        prompt = finish.prompt_tokens or self.prompt_tokens
        completion = self.output_tokens(finish)
        return {
            "id": self.id,
            "object": self.object_name.removesuffix(".chunk"),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": self.fingerprint or None,
            "usage": {
                **usage_dict(prompt, completion),
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
        }


class RichChatFormat(_RichFormat):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def _start(self) -> bytes:
        out = self.out
        parts = []
        prompt_ids = self.prompt_ids if out.return_token_ids else None
        for c in self.choices:
            extra: dict[str, Any] = {"prompt_token_ids": prompt_ids, "prompt_text": None}
            if out.continuous_usage:
                extra["usage"] = self._usage(0, details=True)
            choice = {
                "index": c.index,
                "delta": {"role": out.role, "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            parts.append(self._chunk([choice], **extra))
        if out.echo_text:
            for c in self.choices:
                extra = {"usage": self._usage(0, details=True)} if out.continuous_usage else {}
                choice = {
                    "index": c.index,
                    "delta": {"content": out.echo_text},
                    "logprobs": None,
                    "finish_reason": None,
                }
                parts.append(self._chunk([choice], **extra))
        return b"".join(parts)

    def feed(self, d: replica_pb2.RequestDelta) -> bytes:
        head = b""
        if not self.started:
            self.started = True
            self._prompt(d)
            head = self._start()
        c = self._choice(d)
        if c is None:
            return head
        out = self.out
        text = d.text
        previous = c.tokens
        c.tokens += d.num_tokens
        if not text and not d.token_ids and not previous and not d.finish_reason:
            return head
        logprobs = (
            chat_logprobs(d.logprobs, out.logprobs, out.tokens_as_ids)
            if out.logprobs is not None
            else None
        )
        delta: dict[str, Any] | None
        if c.tools is not None:
            calls = c.tools.feed(text)
            delta = {"tool_calls": calls} if calls else None
        else:
            delta = {"content": text}
        if delta is None:
            if not d.finish_reason and logprobs is None and not out.return_token_ids:
                return head
            delta = {}
        choice: dict[str, Any] = {
            "index": c.index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": None,
        }
        if d.finish_reason:
            reason = c.finish_reason
            if (
                c.tools is not None
                and c.tools.started
                and c.tools.mode == "required"
                and reason == "stop"
            ):
                reason = "tool_calls"
            choice["finish_reason"] = reason
            choice["stop_reason"] = c.stop_reason
        choice["token_ids"] = list(d.token_ids) if out.return_token_ids else None
        extra = self._finish_extra(c)
        if out.continuous_usage:
            extra["usage"] = self._usage(c.tokens, details=True)
        return head + self._chunk([choice], **extra)

    def body(self, finish: replica_pb2.RequestDelta) -> dict[str, Any]:
        out = self.out
        choices = []
        for c in self.choices:
            text = "".join(c.texts)
            calls: list[dict[str, Any]] = []
            if out.tool_choice == "named":
                calls, text = parse_named(text, out.tool_name), ""
            elif out.tool_choice == "required":
                calls, text = parse_required(text, out.parallel_tool_calls), ""
            message: dict[str, Any] = {
                "role": out.role,
                "content": out.echo_text + text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
            }
            if calls:
                message["tool_calls"] = calls
            message["reasoning"] = None
            reason = c.finish_reason
            if out.tool_choice == "required" and reason == "stop":
                reason = "tool_calls"
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": (
                        chat_logprobs(c.logprobs, out.logprobs, out.tokens_as_ids)
                        if out.logprobs is not None
                        else None
                    ),
                    "finish_reason": reason,
                    "stop_reason": c.stop_reason,
                    "token_ids": c.token_ids if out.return_token_ids else None,
                    "routed_experts": None,
                }
            )
        body = self._body(finish, choices)
        body.update(
            prompt_logprobs=None,
            prompt_token_ids=self.prompt_ids if out.return_token_ids else None,
            prompt_text=None,
            kv_transfer_params=None,
            ec_transfer_params=None,
            metrics=None,
        )
        return body


class RichCompletionFormat(_RichFormat):
    object_name = "text_completion"
    id_prefix = "cmpl-"

    def feed(self, d: replica_pb2.RequestDelta) -> bytes:
        if not self.started:
            self.started = True
            self._prompt(d)
        c = self._choice(d)
        if c is None:
            return b""
        out = self.out
        text = d.text
        entries: Sequence[TokenLogprob] = d.logprobs
        prompt_ids = None
        if out.echo and not c.echoed:
            c.echoed = True
            text = out.echo_text + text
            entries = [*self.prompt_logprobs, *entries]
            prompt_ids = self.prompt_ids
        elif out.return_token_ids and not c.echoed:
            c.echoed = True
            prompt_ids = self.prompt_ids
        elif not text and not d.token_ids and not c.tokens and not d.finish_reason:
            return b""
        c.tokens += d.num_tokens
        logprobs = None
        if out.logprobs is not None:
            logprobs = completion_logprobs(entries, out.logprobs, out.tokens_as_ids, c.offset)
            if logprobs["tokens"]:
                c.offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        choice = {
            "index": c.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason or None,
            "stop_reason": c.stop_reason,
            "prompt_token_ids": prompt_ids,
            "token_ids": list(d.token_ids) if out.return_token_ids else None,
        }
        extra = self._finish_extra(c)
        if out.continuous_usage:
            extra["usage"] = self._usage(c.tokens)
        return self._chunk([choice], **extra)

    def body(self, finish: replica_pb2.RequestDelta) -> dict[str, Any]:
        out = self.out
        choices = []
        for c in self.choices:
            text = "".join(c.texts)
            entries: Sequence[TokenLogprob] = c.logprobs
            if out.echo:
                text = out.echo_text + text
                entries = [*self.prompt_logprobs, *entries]
            choices.append(
                {
                    "index": c.index,
                    "text": text,
                    "logprobs": (
                        completion_logprobs(entries, out.logprobs, out.tokens_as_ids)
                        if out.logprobs is not None
                        else None
                    ),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "token_ids": c.token_ids if out.return_token_ids else None,
                    "prompt_logprobs": (
                        prompt_logprobs(self.prompt_logprobs) if self.prompt_logprobs else None
                    ),
                    "prompt_token_ids": self.prompt_ids if out.return_token_ids else None,
                    "routed_experts": None,
                }
            )
        body = self._body(finish, choices)
        body.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
        return body
