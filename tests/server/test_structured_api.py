"""`response_format` over HTTP on the tiny Llama (random weights, SmolLM2's real tokenizer): every reply
parses and validates, constrained and unconstrained rows share batches without leaking into each other,
n > 1 gives each choice its own grammar state, and every bad format is a 400 that loses nothing."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest

PERSON = {  # bounded, so that a random model's greedy reply completes inside max_tokens
    "type": "object",
    "properties": {"name": {"enum": ["Ann", "Bob"]}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
}
ENUM = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}}, "required": ["mood"]}


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def _chat(client, **fields):
    body = {"model": "alpha", "max_tokens": 64, "temperature": 0,
            "messages": [{"role": "user", "content": "describe someone"}], **fields}
    return client.post("/v1/chat/completions", json=body)


def _content(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [c["message"]["content"] for c in response.json()["choices"]]


@pytest.mark.parametrize("model", ["alpha", "tiny"])
def test_json_schema_reply_validates(llama_client, model):
    (text,) = _content(_chat(llama_client, model=model, response_format=_schema_format(PERSON)))
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_reply_is_an_object(llama_client):
    response = _chat(llama_client, response_format={"type": "json_object"}, temperature=1.0, seed=3)
    (text,) = _content(response)
    if response.json()["choices"][0]["finish_reason"] == "stop":  # a random model may ramble to max_tokens
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")


def test_text_format_is_unconstrained(llama_client):
    plain = _content(_chat(llama_client, max_tokens=8, ignore_eos=True))
    assert _content(_chat(llama_client, max_tokens=8, ignore_eos=True, response_format={"type": "text"})) == plain


def test_sampled_choices_each_validate(llama_client):
    response = _chat(llama_client, n=3, temperature=1.0, seed=11, response_format=_schema_format(ENUM))
    texts = _content(response)
    assert len(texts) == 3
    for text in texts:
        jsonschema.validate(json.loads(text), ENUM)


def test_streamed_reply_validates(llama_client):
    body = {"model": "alpha", "max_tokens": 64, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "hi"}], "response_format": _schema_format(PERSON)}
    response = llama_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in map(json.loads, events[:-1]) if c["choices"])
    jsonschema.validate(json.loads(text), PERSON)


def test_constrained_and_plain_rows_in_one_batch_do_not_leak(llama_client):
    """Concurrent requests (so they decode in the same batches): each equals itself sent alone."""
    requests = [
        {"response_format": _schema_format(PERSON)},
        {"max_tokens": 12, "ignore_eos": True},
        {"response_format": _schema_format(ENUM), "model": "tiny"},
        {"max_tokens": 12, "ignore_eos": True, "model": "alpha"},
    ]
    alone = [_content(_chat(llama_client, **fields)) for fields in requests]
    together: list[list[str] | None] = [None] * len(requests)

    def send(i: int) -> None:
        together[i] = _content(_chat(llama_client, **requests[i]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "yaml"}}, "response_format", "type must be one of"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": 3}}}},
     "response_format", "cannot be compiled"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens", "cannot be combined"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "cannot be combined"),
    ({"response_format": "json"}, "response_format", ""),
])
def test_bad_formats_are_400(llama_client, fields, param, words):
    response = _chat(llama_client, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert llama_client.get("/v1/models").status_code == 200  # the server serves on
    (text,) = _content(_chat(llama_client, response_format=_schema_format(ENUM)))
    jsonschema.validate(json.loads(text), ENUM)
