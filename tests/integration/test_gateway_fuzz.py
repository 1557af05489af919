"""Property-based fuzzing of the gateway against its own OpenAPI document (schemathesis).

A fake-engine replica behind `mss gateway` with API keys. schemathesis reads
`/openapi.json`, generates valid and invalid requests for every operation
(its coverage and fuzzing phases) and checks each answer: no 5xx, every
status, content type, header and body documented and matching its schema,
invalid bodies refused, requests without the key refused.

One check is ours instead of schemathesis's `positive_data_acceptance`: a
schema-valid request may still be refused for a limit JSON Schema cannot state
(the model's max_tokens, its vocabulary, min_tokens above max_tokens, the body
size limit, an unknown model), and only for those; any other refusal of a valid
body means the document and the parsers disagree.

Bounded for CI: a few dozen examples per operation, derandomized (the same
cases every run), no example database.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gateway.api_keys import hash_key
from gateway.app import create_api
from gateway.gateway import Gateway, GatewayOptions
from mss.config import parse_config
from tests.support import FAKE_GATEWAY_CONFIG, FAKE_MODEL, Proc, fake_stack

API_KEY = "fuzz-key"
CONFIG = FAKE_GATEWAY_CONFIG.replace(
    "gateway:\n", f"gateway:\n  api_keys: [{{id: fuzz, sha256: {hash_key(API_KEY)}}}]\n"
)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_EXAMPLES = 25

LIMITS_THE_SCHEMA_CANNOT_STATE = re.compile(
    "|".join(
        (
            r"above this model's limit",  # max_tokens: the model's own bound
            r"out of the vocabulary",  # token ids: the model's vocabulary
            r"does not fit the context",  # prompt plus output: the model's context
            r"min_tokens: must be at most",  # one field bounded by another
            r"`logprobs` must be set to true",  # top_logprobs needs logprobs (as vLLM)
            r"exactly one of json, regex",  # structured_outputs: one kind at most
            r"does not match any of the specified `tools`",  # a name referring to another field
            r"either use constraints for structured outputs or tools",
            r"the fake engine cannot",  # what this engine cannot do; vLLM can
            r"the JSON schema is not valid JSON",  # a constraint's own language
        )
    )
)
"""Refusals of schema-valid input that are right: what JSON Schema cannot say."""
REFUSED_FOR_WHO_OR_HOW_MUCH = {401, 404, 413, 429, 503}
"""Answers to a valid body about the caller or the load, never about the body's shape."""


def served_document() -> dict[str, Any]:
    """The document the fuzzed gateway serves, built in-process from the same config (the
    test checks the gateway serves exactly this), so schemathesis has it at collection."""
    options = GatewayOptions(config=parse_config(CONFIG), replicas=[(FAKE_MODEL, "unused:1")])
    return create_api(Gateway(options)).openapi()


DOCUMENT = served_document()
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict(
        {
            "seed": 20_260_101,
            "headers": AUTH,
            "parameters": {"path.model": FAKE_MODEL},
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "checks": {
                "positive_data_acceptance": {"enabled": False},
                # An invalid body too large for the gateway's limit is refused for its size.
                "negative_data_rejection": {"expected-statuses": [400, 401, 404, 405, 413, 415]},
            },
        }
    ),
)


@pytest.fixture(scope="module")
def gateway() -> Iterator[Proc]:
    with fake_stack(FAKE_MODEL, CONFIG) as (_, gateway):
        yield gateway


def test_the_gateway_serves_the_fuzzed_document(gateway: Proc) -> None:
    assert httpx.get(f"{gateway.address}/openapi.json").json() == DOCUMENT


def test_the_document_says_what_the_gateway_answers() -> None:
    """What a schemathesis run found missing once: key, statuses, media types, 400 not 422."""
    assert DOCUMENT["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    paths = DOCUMENT["paths"]
    keyed = ["/v1/chat/completions", "/v1/completions", "/v1/chat/{model}", "/v1/models"]
    for path in [*keyed, "/tokenize", "/detokenize"]:
        (operation,) = paths[path].values()
        assert operation["security"] == [{"bearer": []}], path
        assert "401" in operation["responses"] and "429" in operation["responses"], path
        assert "x-ratelimit" in operation["responses"]["429"]["description"]
    for path in ("/health", "/ready", "/metrics"):
        assert "security" not in paths[path]["get"], path
    assert all("422" not in op["responses"] for ops in paths.values() for op in ops.values())
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    stream = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert "itemSchema" in stream["text/event-stream"] and "application/json" in stream


@schemathesis.check
def valid_data_refused_only_for_limits(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """A schema-valid request is answered, or refused for what its schema cannot state."""
    meta = case.meta
    status = response.status_code
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if status < 400 or status >= 500 or status in REFUSED_FOR_WHO_OR_HOW_MUCH:
        return None
    message = ""
    if status == 400:
        message = response.json()["error"]["message"]
        if LIMITS_THE_SCHEMA_CANNOT_STATE.search(message):
            return None
    raise AssertionError(f"a schema-valid request was refused {status}: {message or response.text}")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_matches_the_document(gateway: Proc, case: schemathesis.Case) -> None:
    case.call_and_validate(
        base_url=gateway.address,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[valid_data_refused_only_for_limits],
    )
