"""Differential conformance: the same OpenAI requests to vLLM's own server and to ours.

vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`) runs the
same converted model with our default engine settings; ours is the session's
real-engine replica behind `mss gateway`. Every request of
`tests.conformance_cases.CASES` goes to both at once, and the answers must
agree on status, JSON shape (keys and value types, recursively) and, for greedy
requests, every value: texts, finish reasons, stop reasons, token counts and
ids, logprobs (within `LOGPROB_TOLERANCE`). A stream is compared per choice as
the sequence of its chunk shapes with consecutive equal shapes merged, plus the
texts and lists it accumulates, so two servers may group tokens into chunks
differently. What may differ is written down: `ALLOWED` (paths, each with its
reason), `ERROR_TYPE_SYNONYMS`, `_fold_choice`, and the cases whose `note`
says why they are not compared field by field.

A failure names the case, the path of each difference and both values, the
request, and both answers.

Also here: the official `openai` client's typed helpers against our gateway,
and the seed route's plain-text acceptance check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pydantic
import pytest
from openai import OpenAI

from mss.config import EngineArgs
from tests.conformance_cases import CASES, MODEL, QUESTION, Case
from tests.support import Proc, engine_env, free_port, sse_events, start_gateway

pytestmark = pytest.mark.engine

VLLM_START_TIMEOUT_S = 240.0
REQUEST_TIMEOUT_S = 60.0
LOGPROB_TOLERANCE = 2e-3
"""Both engines compute in the same dtype on the same CPU; only batching order may differ."""


@dataclass(frozen=True)
class Allowed:
    """A difference the comparison accepts, and why.

    `pattern` is matched against the path of a value with list indices written
    `[*]`, e.g. `choices[*].message.tool_calls[*].id`; a `*` in it matches any run
    of characters.
    kind `value`: the values may differ but not their types; `extra`: the key
    may be present in ours only; `any`: value and type may differ.
    """

    pattern: str
    kind: Literal["value", "extra", "any"]
    why: str


ALLOWED: list[Allowed] = [
    Allowed("id", "value", "response ids are random per request on both servers"),
    Allowed("created", "value", "a Unix timestamp of when each server answered"),
    Allowed("*.tool_calls[*].id", "value", "tool call ids are random on both servers"),
    Allowed(
        "error.message",
        "value",
        "wording is each server's own; ours must name the "
        "field, which `test_conformance` checks for every 400 it answers",
    ),
    Allowed("system_fingerprint", "value", "vLLM writes its version and a config hash"),
    Allowed(
        "error.param",
        "any",
        "vLLM fills it for some errors only (null for n, "
        "min_tokens, schema and regex errors; pydantic's `body.<field>` for type errors); "
        "ours names the field, which `test_conformance` checks for every 400",
    ),
    Allowed("data[*].created", "value", "vLLM writes the time of the request"),
    Allowed(
        "data[*].root",
        "value",
        "vLLM names the model folder it loaded; ours the deployment's model source, both strings",
    ),
    Allowed("data[*].owned_by", "value", "the serving system's name: vllm, mss"),
    Allowed("data[*].ready_replicas", "extra", "ours: replicas ready to serve the model"),
    Allowed("data[*].routing", "extra", "ours: the routing strategy among its replicas"),
    Allowed("data[*].max_tokens", "extra", "ours: the most tokens a request may ask for"),
    Allowed("data[*].permission[*].id", "value", "random permission ids"),
    Allowed("data[*].permission[*].created", "value", "timestamp"),
]


ERROR_TYPE_SYNONYMS = {"Bad Request": "BadRequestError"}
"""vLLM's `error.type` for a 400 is "Bad Request" when FastAPI's request validation caught
it (wrong JSON types) and "BadRequestError" when vLLM's own checks did; which layer
catches a given mistake is vLLM's internal structure, so both read as one value."""

VLLM_ERROR_SHAPE = {"error": {"message": "", "type": "BadRequestError", "param": None, "code": 400}}
"""vLLM's 400 body, for the cases where vLLM has no 400 to compare ours with."""


# ---------------------------------------------------------------------------
# Comparison


@dataclass(frozen=True)
class Difference:
    path: str
    ours: Any
    theirs: Any
    what: str

    def __str__(self) -> str:
        return (
            f"at {self.path or '<top>'}: {self.what}\n"
            f"    ours: {_short(self.ours)}\n    vLLM: {_short(self.theirs)}"
        )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 400 else text[:397] + "..."


def _pattern_path(path: str) -> str:
    out, depth = [], 0
    for ch in path:
        if ch == "[":
            depth += 1
            out.append("[*]")
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


_STREAM_PREFIX = re.compile(r"^streams\.[^.]+\.(chunks\[\*\]|accumulated)\.")


def _matches(generic: str, pattern: str) -> bool:
    """`*` in a pattern matches any run of characters; everything else is literal."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), generic) is not None


def _allowed(path: str, *kinds: str) -> Allowed | None:
    """The entry of one of `kinds` allowing a difference at `path`; stream paths are
    read as the chunk's own (`streams.choice 0.chunks[3].choice.delta` as
    `choices[*].delta`)."""
    generic = _STREAM_PREFIX.sub("", _pattern_path(path))
    if generic.startswith("choice."):
        generic = "choices[*]." + generic[len("choice.") :]
    for entry in ALLOWED:
        if entry.kind in kinds and _matches(generic, entry.pattern):
            return entry
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return type(value).__name__


def diff(ours: Any, theirs: Any, exact: bool, path: str = "") -> list[Difference]:
    """Differences between two decoded JSON values, allow-list applied.

    exact=False compares keys and types only; lists then compare each of our
    elements with vLLM's element at the same place (or its last one).
    """
    if _allowed(path, "any"):
        return []
    if _kind(ours) != _kind(theirs):
        if {_kind(ours), _kind(theirs)} == {"int", "float"} and not exact:
            return []
        return [Difference(path, ours, theirs, f"type {_kind(ours)} != {_kind(theirs)}")]
    if isinstance(ours, dict):
        out: list[Difference] = []
        for key in sorted(set(ours) | set(theirs), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in theirs:
                if not _allowed(sub, "extra", "any"):
                    out.append(Difference(sub, ours[key], "<absent>", "key only in ours"))
            elif key not in ours:
                out.append(Difference(sub, "<absent>", theirs[key], "key missing in ours"))
            else:
                out += diff(ours[key], theirs[key], exact, sub)
        return out
    if isinstance(ours, list):
        if exact and len(ours) != len(theirs):
            return [Difference(path, ours, theirs, f"length {len(ours)} != {len(theirs)}")]
        out = []
        if not theirs:
            return out
        for i, item in enumerate(ours):
            out += diff(item, theirs[min(i, len(theirs) - 1)], exact, f"{path}[{i}]")
        return out
    if not exact or _allowed(path, "value", "any"):
        return []
    if isinstance(ours, float):
        if abs(ours - theirs) > LOGPROB_TOLERANCE:
            return [Difference(path, ours, theirs, "numbers differ")]
        return []
    if ours != theirs:
        return [Difference(path, ours, theirs, "values differ")]
    return []


# Streams: what a choice accumulates, and the shapes of its chunks.
_TEXT_KEYS = ("content", "text", "arguments", "reasoning", "reasoning_content")
_LIST_PATHS = (
    "logprobs.content",
    "logprobs.tokens",
    "logprobs.token_logprobs",
    "logprobs.top_logprobs",
    "logprobs.text_offset",
    "token_ids",
)
TEXT, LIST = "<accumulated text>", "<accumulated list>"


def _fold(value: Any, path: str, acc: dict[str, Any]) -> Any:
    """`value` with accumulated texts and lists replaced by markers, added to `acc`."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            sub = f"{path}.{key}" if path else key
            if key in _TEXT_KEYS and isinstance(item, str):
                acc[sub] = acc.get(sub, "") + item
                out[key] = TEXT
            elif any(sub.endswith(p) for p in _LIST_PATHS) and isinstance(item, list):
                acc[sub] = acc.get(sub, []) + item
                out[key] = LIST
            elif key == "usage" and isinstance(item, dict) and path == "":
                acc["usage (last)"] = item
                out[key] = {k: 0 for k in item}
            elif key == "tool_calls" and isinstance(item, list):
                # Streamed tool calls say which call a delta extends by `index`.
                out[key] = [
                    _fold(call, f"{sub}[{call.get('index', i)}]", acc)
                    if isinstance(call, dict)
                    else call
                    for i, call in enumerate(item)
                ]
            else:
                out[key] = _fold(item, sub, acc)
        return out
    if isinstance(value, list):
        return [_fold(item, f"{path}[{i}]", acc) for i, item in enumerate(value)]
    return value


def _fold_choice(part: dict[str, Any]) -> dict[str, Any]:
    """The finishing chunk's empty delta read one way.

    vLLM's finishing chunk after an end-of-sequence token has `delta: {"content": ""}`
    without a tool parser and `delta: {}` with one (the reference runs with one for tool
    calls only); both mean "no more text", so `{"content": ""}` is read as `{}` there.
    """
    choice = part.get("choice")
    if (
        isinstance(choice, dict)
        and choice.get("finish_reason")
        and choice.get("delta") == {"content": ""}
    ):
        return {**part, "choice": {**choice, "delta": {}}}
    return part


def normalize_stream(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """One record per choice index (and `other` for chunks without choices)."""
    streams: dict[str, dict[str, Any]] = {}
    ids = {chunk.get("id") for chunk in chunks}
    for chunk in chunks:
        top = {k: v for k, v in chunk.items() if k != "choices"}
        choices = chunk.get("choices") or []
        parts = [(f"choice {c.get('index')}", {**top, "choice": c}) for c in choices] or [
            ("other", top)
        ]
        for key, part in parts:
            record = streams.setdefault(key, {"chunks": [], "accumulated": {}})
            part = _fold_choice(part)
            shape = _fold(part, "", record["accumulated"])
            if not record["chunks"] or record["chunks"][-1] != shape:
                record["chunks"].append(shape)
    return {"one id per stream": len(ids) == 1, "streams": streams}


# ---------------------------------------------------------------------------
# Sending


@dataclass
class Answer:
    status: int
    content_type: str
    body: Any
    """Decoded JSON, or the parsed stream: {"events": [...], "done": bool}."""

    def comparable(self) -> Any:
        if isinstance(self.body, dict) and "events" in self.body:
            return {
                "ends with [DONE]": self.body["done"],
                "event names": self.body["names"],
                **normalize_stream(self.body["events"]),
            }
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict) and error.get("type") in ERROR_TYPE_SYNONYMS:
            return {**self.body, "error": {**error, "type": ERROR_TYPE_SYNONYMS[error["type"]]}}
        return self.body


def send(client: httpx.Client, base: str, case: Case) -> Answer:
    url = base + case.path
    if case.method == "GET":
        resp = client.get(url)
        return Answer(resp.status_code, _ctype(resp), _decode(resp.content))
    kwargs: dict[str, Any] = {"headers": {"content-type": "application/json"}}
    kwargs["content"] = case.raw if case.raw is not None else json.dumps(case.body)
    with client.stream("POST", url, **kwargs) as resp:
        data = resp.read()
        ctype = _ctype(resp)
    if ctype == "text/event-stream":
        events = sse_events(data.decode())
        body = {
            "events": [e for _, e in events if isinstance(e, dict)],
            "done": bool(events) and events[-1][1] == "[DONE]",
            "names": sorted({str(name) for name, _ in events}),
        }
        return Answer(resp.status_code, ctype, body)
    return Answer(resp.status_code, ctype, _decode(data))


def _ctype(resp: httpx.Response) -> str:
    return resp.headers.get("content-type", "").split(";")[0].strip()


def _decode(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")


# ---------------------------------------------------------------------------
# The two servers


@pytest.fixture(scope="module")
def vllm_process() -> Iterator[Proc]:
    """vLLM's OpenAI server, started (not yet waited for) with our default engine settings."""
    from replica.model_store import resolve_model

    args = EngineArgs()
    port = free_port()
    kv_bytes = int(args.kv_cache_gib * (1 << 30))
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(resolve_model(MODEL)), "--served-model-name", MODEL,
        "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
        "--max-num-seqs", str(args.max_num_seqs), "--seed", str(args.seed),
        "--kv-cache-memory-bytes", str(kv_bytes),
        # vLLM 0.32 serves required and named tool_choice (constrained decoding, the same
        # for every parser) only with a tool parser enabled; pythonic is one that changes
        # nothing else (measured: every other case answers the same as without it, but
        # for the last chunk's empty delta, see `_fold_choice`).
        "--enable-auto-tool-choice", "--tool-call-parser", "pythonic",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    env = engine_env()
    env["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_gib:g}"
    fd, log_path = tempfile.mkstemp(prefix="mss-vllm-server-", suffix=".log")
    popen = subprocess.Popen(
        cmd, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        start_new_session=True,
    )  # fmt: skip
    os.close(fd)
    proc = Proc(proc=popen, log_path=Path(log_path), address=f"http://127.0.0.1:{port}")
    proc.extra["started"] = time.monotonic()
    try:
        yield proc
    finally:
        proc.stop(timeout=30)


@pytest.fixture(scope="module")
def vllm_server(vllm_process: Proc, request: pytest.FixtureRequest) -> str:
    """vLLM's server once it answers /health.

    The session's replica is asked for only now, so that when this module starts it,
    both engines load at once (pytest would set up a session fixture named as an
    argument before every module fixture).
    """
    request.getfixturevalue("real_replica")
    proc = vllm_process
    started = float(proc.extra["started"])  # type: ignore[arg-type]
    deadline = started + VLLM_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"vLLM's server exited:\n{proc.log()[-3000:]}")
        try:
            if httpx.get(proc.address + "/health", timeout=2).status_code == 200:
                print(f"vLLM's server ready {time.monotonic() - started:.1f} s after start")
                return proc.address
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"vLLM's server not ready in {VLLM_START_TIMEOUT_S:.0f} s")


@pytest.fixture(scope="module")
def gateway(request: pytest.FixtureRequest) -> Iterator[str]:
    """`mss gateway` in front of the session's real-engine replica."""
    replica: Proc = request.getfixturevalue("real_replica")
    proc = start_gateway([(MODEL, replica.address)], timeout=60)
    try:
        yield proc.address
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as c:
        yield c


# ---------------------------------------------------------------------------
# Tests


def _report(case: Case, diffs: list[Difference], ours: Answer, theirs: Answer) -> str:
    lines = [f"{case.name}: {len(diffs)} difference(s) from vLLM's server", *map(str, diffs[:8])]
    if len(diffs) > 8:
        lines.append(f"... and {len(diffs) - 8} more")
    lines.append(f"request: {case.method} {case.path} {_short(case.body or case.raw)}")
    lines.append(f"full answers:\n  ours: {_short(ours.body)}\n  vLLM: {_short(theirs.body)}")
    return "\n".join(lines)


def _field_named(body: Any, name: str) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return False
    return name in str(error.get("message", "")) or name in str(error.get("param") or "")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conformance(case: Case, vllm_server: str, gateway: str, client: httpx.Client) -> None:
    """One request to both servers; their answers agree but for what is written down."""
    # The two engines each decode on one thread: sending to both at once halves the time,
    # and neither engine's batch holds the other's request.
    with ThreadPoolExecutor(2) as pool:
        asked = pool.submit(send, client, vllm_server, case)
        ours = send(client, gateway, case)
        theirs = asked.result()
    if case.compare == "ours_refuses":
        assert ours.status == 400, f"{case.note}\nours answered {ours.status}: {ours.body}"
        assert _field_named(ours.body, case.field), f"the error must name {case.field}: {ours.body}"
        shape = diff(ours.body, VLLM_ERROR_SHAPE, exact=False)
        assert not shape, "\n".join(map(str, shape))
        return
    if case.compare == "status":
        assert ours.status == theirs.status, f"{case.note}\nours: {ours.body}\nvLLM: {theirs.body}"
        shape = diff(ours.body, {"error": {**VLLM_ERROR_SHAPE["error"], "type": ""}}, exact=False)
        assert not shape, "\n".join(map(str, shape))
        return
    exact = case.compare == "exact"
    if case.compare == "seeded":
        again = send(client, vllm_server, case)
        exact = diff(again.comparable(), theirs.comparable(), exact=True) == []
    diffs = []
    if ours.status != theirs.status:
        diffs.append(Difference("<status>", ours.status, theirs.status, "status differs"))
    if ours.content_type != theirs.content_type:
        diffs.append(
            Difference(
                "<content-type>", ours.content_type, theirs.content_type, "content types differ"
            )
        )
    diffs += diff(ours.comparable(), theirs.comparable(), exact)
    assert not diffs, _report(case, diffs, ours, theirs)
    if ours.status == 400 and case.field:
        assert _field_named(ours.body, case.field), f"the error must name {case.field}: {ours.body}"


# ---------------------------------------------------------------------------
# The official client's typed helpers, against our gateway


class City(pydantic.BaseModel):
    city: str
    country: str


def test_openai_parse_with_a_pydantic_response_format(gateway: str) -> None:
    client = OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Name the capital of France and its country."}],
        response_format=City,
        temperature=0,
        max_tokens=40,
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop", message
    assert isinstance(message.parsed, City), message
    assert message.parsed.city and message.parsed.country


class GetWeather(pydantic.BaseModel):
    """Current weather in a city."""

    city: str


def test_openai_parse_with_a_forced_tool_call(gateway: str) -> None:
    import openai

    client = OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
        temperature=0,
        max_tokens=40,
    )
    choice = completion.choices[0]
    assert choice.message.tool_calls, choice.message
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather), call
    assert call.function.parsed_arguments.city


# ---------------------------------------------------------------------------
# The seed route's plain-text body is the user's message


def _first_words(base: str) -> str:
    """POST the question as text/plain; read tokens until some text, then hang up."""
    text = ""
    headers = {"content-type": "text/plain"}
    with httpx.stream("POST", f"{base}/v1/chat/{MODEL}", content=QUESTION, headers=headers,
                      timeout=REQUEST_TIMEOUT_S) as resp:  # fmt: skip
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("finished"):
                break
            text += event["token"]
            if text.strip():
                break
    return text


def test_seed_route_plain_text_answers_every_time(gateway: str) -> None:
    answers = [_first_words(gateway) for _ in range(10)]
    assert all(a.strip() for a in answers), answers


def test_seed_route_json_greedy_says_paris(gateway: str) -> None:
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": 24, "stream": False}  # fmt: skip
    resp = httpx.post(f"{gateway}/v1/chat/{MODEL}", json=body, timeout=REQUEST_TIMEOUT_S)
    assert resp.status_code == 200, resp.text
    assert "Paris" in resp.json()["text"], resp.json()
