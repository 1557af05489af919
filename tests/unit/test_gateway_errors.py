"""Error bodies repeat at most a bounded prefix of what the client sent."""

from __future__ import annotations

import pytest

from gateway.api_models import parse_seed_json
from gateway.errors import MESSAGE_LIMIT, QUOTE_LIMIT, ApiError, quote


def test_quote_keeps_short_input_and_cuts_long_input_saying_how_much() -> None:
    assert quote("smollm2") == "smollm2"
    assert quote(repr("a")) == "'a'"
    cut = quote("x" * 10_000)
    assert len(cut) < QUOTE_LIMIT + 30
    assert cut.startswith("x" * (QUOTE_LIMIT - 3) + "...") and "9939 characters" in cut


def test_an_api_error_bounds_its_message_and_param_whatever_its_caller_passed() -> None:
    err = ApiError(400, "m" * 50_000, param="p" * 50_000)
    assert len(err.message) < MESSAGE_LIMIT + 30
    assert err.param is not None and len(err.param) < MESSAGE_LIMIT + 30
    assert len(err.body()) < 2 * MESSAGE_LIMIT + 200


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "a", "k" * 10_000: 1},  # an unknown field's name
        {"prompt": "a", "temperature": "t" * 10_000},  # a value of the wrong type
        {"messages": [{"role": "r" * 10_000, "content": "x"}]},
        {"prompt": "a", "logit_bias": {"b" * 10_000: 1}},
    ],
)
def test_a_refusal_quotes_a_bounded_prefix_of_the_input(body: dict[str, object]) -> None:
    with pytest.raises(ApiError) as refused:
        parse_seed_json(body, None)
    assert len(refused.value.body()) < 400, refused.value.message
