"""Logprobs, n, best_of, echo, penalties and logit_bias over HTTP on the tiny Llama: OpenAI's shapes,
streamed chunks that add up to the whole answer, and each setting visible in the output."""

from __future__ import annotations

import json

import pytest

PROMPT = "Once upon a time"


def _send(client, route: str, **fields):
    body = {"model": "alpha", "max_tokens": 6, "temperature": 0, "ignore_eos": True, **fields}
    if route == "chat":
        body.setdefault("messages", [{"role": "user", "content": "tell me a story"}])
    else:
        body.setdefault("prompt", PROMPT)
    response = client.post("/v1/chat/completions" if route == "chat" else "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def _post(client, route: str, **fields) -> dict:
    return _send(client, route, **fields).json()


def _stream(client, route: str, **fields) -> list[dict]:
    response = _send(client, route, stream=True, **fields)
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _joined_completion_logprobs(chunks: list[dict], index: int = 0) -> dict:
    joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["index"] == index and choice["logprobs"]:
                for key in joined:
                    joined[key] += choice["logprobs"][key]
    return joined


def test_completion_logprobs_shape_and_greedy_consistency(llama_client):
    out = _post(llama_client, "completion", logprobs=3)
    logprobs = out["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == 6 == out["usage"]["completion_tokens"]
    for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy picks the most likely token
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], logprobs["tokens"]))
    assert _post(llama_client, "completion")["choices"][0]["logprobs"] is None
    zero = _post(llama_client, "completion", logprobs=0)["choices"][0]["logprobs"]
    assert zero["token_logprobs"] == logprobs["token_logprobs"] and zero["top_logprobs"] == [{}] * 6


def test_echo_prepends_the_prompt_and_its_logprobs(llama_client):
    plain = _post(llama_client, "completion", logprobs=2)["choices"][0]
    echoed = _post(llama_client, "completion", logprobs=2, echo=True)["choices"][0]
    assert echoed["text"] == PROMPT + plain["text"]
    prompt_tokens = len(llama_client.app.state.loraplex.base.tokenizer(PROMPT)["input_ids"])
    logprobs = echoed["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(lp is not None for lp in logprobs["token_logprobs"][1:])
    assert logprobs["token_logprobs"][prompt_tokens:] == plain["logprobs"]["token_logprobs"]
    assert "".join(logprobs["tokens"][:prompt_tokens]) == PROMPT
    assert _post(llama_client, "completion", echo=True)["choices"][0]["text"] == echoed["text"]
    chunks = _stream(llama_client, "completion", logprobs=2, echo=True)
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed["text"]
    assert _joined_completion_logprobs(chunks) == logprobs


def test_streamed_completion_logprobs_add_up_to_the_whole(llama_client):
    whole = _post(llama_client, "completion", logprobs=4, max_tokens=10)["choices"][0]["logprobs"]
    assert _joined_completion_logprobs(_stream(llama_client, "completion", logprobs=4, max_tokens=10)) == whole


def test_chat_logprobs_shape_and_stream(llama_client):
    out = _post(llama_client, "chat", logprobs=True, top_logprobs=2)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 6
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert len(entry["top_logprobs"]) == 2 and entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
        assert all(set(top) == {"token", "logprob", "bytes"} for top in entry["top_logprobs"])
    only = _post(llama_client, "chat", logprobs=True)["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in only] == [e["logprob"] for e in content] and all(not e["top_logprobs"] for e in only)
    assert _post(llama_client, "chat")["choices"][0]["logprobs"] is None
    chunks = _stream(llama_client, "chat", logprobs=True, top_logprobs=2)
    streamed = [e for c in chunks for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert streamed == content


@pytest.mark.parametrize("route", ["completion", "chat"])
def test_n_choices_are_independent_and_streamed_by_index(llama_client, route):
    fields = {"n": 3, "temperature": 1.0, "seed": 4}
    out = _post(llama_client, route, **fields)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] if route == "chat" else c["text"] for c in out["choices"]]
    assert len(set(texts)) == 3
    assert out["usage"]["completion_tokens"] == 18
    single = _post(llama_client, route, temperature=1.0, seed=4)["choices"][0]
    assert (single["message"]["content"] if route == "chat" else single["text"]) == texts[0]
    chunks = _stream(llama_client, route, stream_options={"include_usage": True}, **fields)
    assert chunks[-1]["usage"] == out["usage"]
    for index, text in enumerate(texts):
        parts = [ch["delta"].get("content", "") if route == "chat" else ch["text"]
                 for c in chunks for ch in c["choices"] if ch["index"] == index]
        assert "".join(parts) == text


def test_best_of_returns_the_choices_with_the_highest_cumulative_logprob(llama_client):
    fields = {"temperature": 1.0, "seed": 11, "max_tokens": 5}
    every = _post(llama_client, "completion", n=4, logprobs=0, **fields)["choices"]
    cumulative = [sum(c["logprobs"]["token_logprobs"]) for c in every]
    ranked = sorted(range(4), key=lambda i: cumulative[i], reverse=True)
    best = _post(llama_client, "completion", best_of=4, n=2, **fields)
    assert [c["text"] for c in best["choices"]] == [every[i]["text"] for i in ranked[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in best["choices"])  # computed to rank them, not asked for
    assert best["usage"]["completion_tokens"] == 10


def test_penalties_and_logit_bias_change_the_output(llama_client):
    tokenizer = llama_client.app.state.loraplex.base.tokenizer
    plain = _post(llama_client, "completion")["choices"][0]["text"]
    token = tokenizer(" dragon", add_special_tokens=False)["input_ids"][0]
    biased = _post(llama_client, "completion", logit_bias={str(token): 100})["choices"][0]["text"]
    assert biased == tokenizer.decode([token] * 6)
    penalized = _post(llama_client, "completion", logit_bias={str(token): 5}, frequency_penalty=2.0,
                      presence_penalty=2.0, repetition_penalty=3.0)["choices"][0]["text"]
    assert penalized != biased and penalized != plain
    chat = _post(llama_client, "chat", logit_bias={str(token): 100}, max_tokens=3)["choices"][0]["message"]["content"]
    assert chat == tokenizer.decode([token] * 3)
