"""OpenAI fields we do not implement are refused with a 400 naming them (their "off" value is a no-op),
unknown fields are refused, the fields we serve are refused out of their bounds, naming them, and the
context-length checks give the numbers (prompt-learning virtual tokens included)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from peft import PromptTuningConfig, TaskType

from server.api.app import create_app
from server.config import ServerConfig
from tests.server.conftest import make_peft_folder

CONTEXT = 32
VIRTUAL_TOKENS = 5
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"prompt": "hi"}

# field -> a value that asks for something we do not serve (on completions, the chat-only fields are
# unknown fields; chat's top_logprobs without logprobs: true is refused too)
REFUSED_ON_BOTH = {
    "suffix": " the end",
    "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
    "functions": [{"name": "f"}], "top_logprobs": 3, "max_token": 5, "min_p": 0.1,
}
CHAT_ONLY_VALUES: dict = {}
REFUSED_ON_COMPLETIONS = {"response_format": {"type": "json_object"}}  # chat serves it (test_structured_api.py)
REFUSED = [(kind, field) for kind in ("completion", "chat") for field in sorted(REFUSED_ON_BOTH)] + [
    ("completion", field) for field in sorted(REFUSED_ON_COMPLETIONS)]
# (route kind, field, value): a served field out of its bounds, or a value the server cannot serve
OUT_OF_BOUNDS = [
    ("completion", "logprobs", 21), ("completion", "logprobs", -1), ("chat", "top_logprobs", 21),
    ("completion", "presence_penalty", 2.5), ("chat", "frequency_penalty", -2.01),
    ("completion", "repetition_penalty", 0), ("chat", "repetition_penalty", -1.0),
    ("completion", "logit_bias", {"42": 100.5}), ("chat", "logit_bias", {"x": 1.0}),
    ("completion", "logit_bias", {"99999999": 1.0}),  # no such token id
    ("completion", "n", 17), ("chat", "n", 17), ("completion", "n", 0),  # above --max-num-seqs (16), or none
    ("completion", "best_of", 0), ("chat", "best_of", 2),  # chat has no best_of
    ("chat", "echo", True),  # completions only
]
# field -> OpenAI's default ("off"), accepted as a no-op
NO_OPS = {
    "completion": {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": None,
                   "best_of": 1, "echo": False, "suffix": None, "user": "someone", "n": 1},
    "chat": {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "logprobs": False,
             "top_logprobs": 0, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
             "functions": None, "parallel_tool_calls": True, "user": "someone"},
}


def _route(kind: str) -> tuple[str, dict]:
    return ("/v1/chat/completions", CHAT) if kind == "chat" else ("/v1/completions", COMPLETION)


@pytest.mark.parametrize("kind, field", REFUSED)
def test_unimplemented_or_unknown_fields_are_refused_by_name(llama_client, kind, field):
    route, body = _route(kind)
    value = {**REFUSED_ON_BOTH, **REFUSED_ON_COMPLETIONS}[field]
    value = CHAT_ONLY_VALUES.get(field, value) if kind == "chat" else value
    response = llama_client.post(route, json={"model": "alpha", "max_tokens": 2, **body, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == field and field in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_the_default_value_of_an_unimplemented_field_is_a_no_op(llama_client, kind):
    route, body = _route(kind)
    plain = {"model": "alpha", "max_tokens": 3, "temperature": 0, "ignore_eos": True, **body}
    expected = llama_client.post(route, json=plain)
    answer = llama_client.post(route, json={**plain, **NO_OPS[kind]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"] == expected.json()["choices"]


@pytest.mark.parametrize("kind,field,value", OUT_OF_BOUNDS)
def test_served_fields_out_of_bounds_are_refused_by_name(llama_client, kind, field, value):
    route, body = _route(kind)
    response = llama_client.post(route, json={"model": "alpha", "max_tokens": 2, **body, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].split(".")[0] == field and field in error["message"], error


def test_best_of_below_n_or_streamed_is_refused_by_name(llama_client):
    base = {"model": "alpha", "prompt": "hi", "max_tokens": 2}
    for extra in ({"best_of": 1, "n": 2}, {"best_of": 2, "stream": True}, {"best_of": 17}):
        response = llama_client.post("/v1/completions", json={**base, **extra})
        assert response.status_code == 400, (extra, response.text)
        assert response.json()["error"]["param"] == "best_of", extra
    assert llama_client.post("/v1/completions", json={**base, "best_of": 1, "stream": True}).status_code == 200


def test_tool_calling_is_refused_in_plain_words(llama_client):
    for field, value in (("tools", REFUSED_ON_BOTH["tools"]), ("tool_choice", "required")):
        response = llama_client.post("/v1/chat/completions", json={"model": "alpha", **CHAT, field: value})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == field and "tool calling is not supported" in error["message"], error


def test_stream_options_without_stream_is_refused(llama_client):
    body = {"model": "alpha", "prompt": "hi", "max_tokens": 2, "stream_options": {"include_usage": True}}
    response = llama_client.post("/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


def test_disagreeing_max_tokens_and_max_completion_tokens_are_refused(llama_client):
    body = {"model": "alpha", **CHAT, "max_tokens": 2, "max_completion_tokens": 3}
    response = llama_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_completion_tokens"
    same = llama_client.post("/v1/chat/completions", json={**body, "max_tokens": 3})
    assert same.status_code == 200 and same.json()["usage"]["completion_tokens"] <= 3


def test_chat_text_parts_and_the_developer_role_are_served(llama_client):
    plain = {"model": "alpha", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
             "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nthere"}]}
    parts = {**plain, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]}
    expected = llama_client.post("/v1/chat/completions", json=plain)
    answer = llama_client.post("/v1/chat/completions", json=parts)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"] == expected.json()["choices"]
    assert answer.json()["usage"] == expected.json()["usage"]
    image = {**plain, "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                                 {"type": "image_url", "image_url": {"url": "x"}}]}]}
    refused = llama_client.post("/v1/chat/completions", json=image)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "messages.0.content" and '"image_url"' in error["message"], error
    assert "not supported" in error["message"] and error["message"].count("messages.0.content") == 1


# -- the context: prompt + virtual tokens + completion ------------------------------------------------

def _prompt(tokens: int) -> str:
    """A prompt of exactly `tokens` tokens on SmolLM2's tokenizer (" a" is one token; no BOS is added)."""
    return "a" + " a" * (tokens - 1)


@pytest.fixture(scope="module")
def prompt_tuning_folder(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=VIRTUAL_TOKENS)
    return make_peft_folder(tiny_llama_dir, tmp_path_factory.mktemp("pt") / "prompt", config, 21,
                            "prompt_encoder", lambda p: p.normal_(0, 1.0))


@pytest.fixture
def short_client(tmp_path, tiny_llama_base, tiny_adapters, prompt_tuning_folder):
    config = ServerConfig(
        base=str(tiny_llama_base.prepared.path), served_name="tiny", state_dir=tmp_path / "state",
        admin_token="test-token", max_model_len=CONTEXT, max_tokens_limit=64, default_max_tokens=8,
        adapters={"alpha": str(tiny_adapters["alpha"]), "prompt": str(prompt_tuning_folder)},
    )
    with TestClient(create_app(config, base=tiny_llama_base)) as client:
        assert len(tiny_llama_base.tokenizer(_prompt(CONTEXT))["input_ids"]) == CONTEXT
        yield client


def _post(client, model: str, tokens: int, **fields):
    return client.post("/v1/completions", json={"model": model, "prompt": _prompt(tokens), "temperature": 0,
                                                "ignore_eos": True, **fields})


@pytest.mark.parametrize("tokens", [CONTEXT, CONTEXT + 7])
def test_a_prompt_filling_the_context_without_max_tokens_is_a_clear_400(short_client, tokens):
    """Before: a prompt of exactly the context got max_tokens 0 and was served; a longer one was refused
    only because its negative default max_tokens met the min_tokens check."""
    response = _post(short_client, "alpha", tokens)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt"
    assert f"maximum context length is {CONTEXT} tokens" in error["message"]
    assert f"{tokens} in the prompt" in error["message"] and "no room" in error["message"]


def test_without_max_tokens_the_default_is_capped_by_the_room_left(short_client):
    assert _post(short_client, "alpha", CONTEXT - 1).json()["usage"]["completion_tokens"] == 1
    assert _post(short_client, "alpha", CONTEXT - 3).json()["usage"]["completion_tokens"] == 3
    assert _post(short_client, "alpha", 4).json()["usage"]["completion_tokens"] == 8  # default_max_tokens


def test_prompt_plus_max_tokens_past_the_context_gives_the_numbers(short_client):
    response = _post(short_client, "alpha", CONTEXT - 2, max_tokens=5)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert f"maximum context length is {CONTEXT} tokens" in message
    assert f"you requested {CONTEXT + 3} tokens ({CONTEXT - 2} in the prompt, 5 in the completion)" in message
    assert response.json()["error"]["param"] == "max_tokens"
    assert _post(short_client, "alpha", CONTEXT - 2, max_tokens=2).status_code == 200


def test_prompt_tuning_virtual_tokens_count_against_the_context(short_client):
    """Before: the route let the prompt through and the scheduler's own check raised ValueError: a 500."""
    fits = CONTEXT - VIRTUAL_TOKENS - 2
    assert _post(short_client, "prompt", fits, max_tokens=2).status_code == 200
    over = _post(short_client, "prompt", fits, max_tokens=3)
    assert over.status_code == 400, over.text
    message = over.json()["error"]["message"]
    assert f"{VIRTUAL_TOKENS} virtual tokens of adapter 'prompt'" in message
    assert f"you requested {CONTEXT + 1} tokens" in message
    no_room = _post(short_client, "prompt", CONTEXT - VIRTUAL_TOKENS)  # fits without the virtual tokens' room
    assert no_room.status_code == 400 and "no room" in no_room.json()["error"]["message"]
    defaulted = _post(short_client, "prompt", CONTEXT - VIRTUAL_TOKENS - 1)
    assert defaulted.status_code == 200 and defaulted.json()["usage"]["completion_tokens"] == 1
    assert short_client.get("/health").status_code == 200
