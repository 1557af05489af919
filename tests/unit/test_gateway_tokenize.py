"""`/tokenize` and `/detokenize` bodies: vLLM's fields mapped onto the replica's RPCs."""

from __future__ import annotations

import json

import pytest

from gateway.errors import ApiError
from gateway.tokenize_api import detokenize_request, tokenize_request


def test_a_prompt_and_a_chat_become_tokenize_requests() -> None:
    model, req = tokenize_request({"model": "m", "prompt": "hi", "return_token_strs": True})
    assert model == "m" and req.prompt == "hi" and req.return_token_strs
    assert req.HasField("add_special_tokens") and req.add_special_tokens  # vLLM's default: true
    model, req = tokenize_request(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "add_generation_prompt": False,
            "chat_template_kwargs": {"x": 1},
            "tools": [{"type": "function", "function": {"name": "f"}}],
        }
    )
    assert model == "" and [m.content for m in req.messages] == ["hi"]
    assert req.HasField("add_special_tokens") and not req.add_special_tokens  # chat: false
    assert not req.chat_template.add_generation_prompt
    assert json.loads(req.chat_template.kwargs_json) == {"x": 1}
    assert json.loads(req.tools_json)[0]["function"]["name"] == "f"
    model, detok = detokenize_request({"model": "m", "tokens": [1, 2]})
    assert model == "m" and list(detok.tokens) == [1, 2]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "colour": 1}, "colour"),
        ({"prompt": "x", "chat_template": "{{ x }}"}, "chat_template"),
        (
            {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
            "continue_final_message",
        ),
    ],
)
def test_bad_tokenize_bodies_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as err:
        tokenize_request(body)
    assert err.value.status == 400 and err.value.param == param


def test_bad_detokenize_bodies_name_the_field() -> None:
    for body in ({"tokens": [-1]}, {"tokens": ["a"]}, {}):
        with pytest.raises(ApiError) as err:
            detokenize_request(body)  # type: ignore[arg-type]
        assert err.value.status == 400 and str(err.value.param).startswith("tokens")
