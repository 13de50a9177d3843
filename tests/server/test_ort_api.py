"""`--backend onnxruntime` through the HTTP API (app factory, TestClient) on exports of the tiny adapters:
classification and completion equal PEFT's unmerged adapter, add-adapter takes export folders and refuses
everything else with a 400, the session LRU stays bounded, config refusals, metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from server.api.app import create_app
from server.cli import EXIT_USAGE, main
from server.config import ServerConfig
from tests.conftest import TINY_LABELS
from tests.server.conftest import ADMIN

TEXTS = ["a wonderful, moving film", "dull and far too long", "meh"]
PROMPT = "The quick brown fox"


def _config(tmp_path: Path, adapters: dict[str, Path], **extra) -> ServerConfig:
    """`adapter_roots`: pytest's base temp (the session's export folders may be hot-added), unless given."""
    extra.setdefault("adapter_roots", [tmp_path.parent])
    return ServerConfig(backend="onnxruntime", adapters={k: str(v) for k, v in adapters.items()},
                        state_dir=tmp_path / "state", admin_token="test-token", **extra)


@pytest.fixture
def ort_bert(tmp_path, tiny_exports):
    config = _config(tmp_path, {"two": tiny_exports["two"], "three": tiny_exports["three"]})
    with TestClient(create_app(config)) as client:
        yield client


@pytest.fixture
def ort_llama(tmp_path, tiny_exports):
    config = _config(tmp_path, {"chat": tiny_exports["chat"]}, max_model_len=256, max_tokens_limit=64)
    with TestClient(create_app(config)) as client:
        yield client


def _peft_probs(base_dir: Path, adapter: Path, num_labels: int) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    model = PeftModel.from_pretrained(model, adapter).eval()
    batch = AutoTokenizer.from_pretrained(base_dir)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**batch).logits, -1)


@pytest.mark.parametrize("name,labels", [("two", TINY_LABELS), ("three", ("LABEL_0", "LABEL_1", "LABEL_2"))])
def test_classify_equals_peft(ort_bert, tiny_bert_dir, tiny_export_adapters, name, labels):
    response = ort_bert.post("/v1/classify", json={"model": name, "input": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["prompt_tokens"] > 0 and [d["index"] for d in body["data"]] == [0, 1, 2]
    expected = _peft_probs(tiny_bert_dir, tiny_export_adapters[name], len(labels))
    for row, probs in zip(body["data"], expected):
        got = torch.tensor([row["probs"][label] for label in labels])
        torch.testing.assert_close(got, probs, atol=1e-5, rtol=1e-4)
        assert row["label"] == labels[int(probs.argmax())]


def test_models_lists_base_and_exports(ort_bert, tiny_bert_dir):
    cards = {c["id"]: c for c in ort_bert.get("/v1/models").json()["data"]}
    base = tiny_bert_dir.name  # learned from the first export's manifest (no --base given)
    assert set(cards) == {base, "two", "three"}
    assert cards["two"]["parent"] == base and cards["two"]["task"] == "classification"


@pytest.mark.parametrize("body,status,words", [
    ({"input": "x"}, 400, "no classification head"),  # the base's own name: filled in below
    ({"model": "nope", "input": "x"}, 404, "does not exist"),
    ({"model": "two", "input": []}, 400, "at least one"),
    ({"model": "two", "input": ["x"] * 65}, 400, "at most 64"),
])
def test_bad_classify_requests(ort_bert, tiny_bert_dir, body, status, words):
    body = {"model": tiny_bert_dir.name, **body}
    response = ort_bert.post("/v1/classify", json=body)
    assert response.status_code == status and words in response.json()["error"]["message"]
    assert ort_bert.post("/v1/classify", json={"model": "two", "input": "ok"}).status_code == 200


def test_completions_refused_on_an_encoder_base(ort_bert):
    response = ort_bert.post("/v1/completions", json={"model": "two", "prompt": "hi"})
    assert response.status_code == 400 and "classify" in response.json()["error"]["message"]


def test_add_adapter_takes_exports_and_refuses_the_rest(ort_bert, tiny_exports, tiny_export_adapters, tmp_path):
    add = lambda name, path: ort_bert.post("/admin/adapters", json={"name": name, "path": str(path)}, headers=ADMIN)
    response = add("int8", tiny_exports["two-int8"])
    assert response.status_code == 200, response.text
    assert ort_bert.post("/v1/classify", json={"model": "int8", "input": TEXTS}).status_code == 200
    tampered = Path(shutil.copytree(tiny_exports["three"], tmp_path / "tampered"))
    (tampered / "config.json").write_text((tampered / "config.json").read_text() + " ")
    refusals = {
        "adapter": (tiny_export_adapters["two"], "not an export folder (it is an adapter folder)"),
        "merged": (tiny_exports["two-merged"], "is a merged export"),
        "other-base": (tiny_exports["chat"], "was made from base"),
        "missing": (tmp_path / "nowhere", "is not a directory"),
        "tampered": (tampered, "does not match its hash"),
    }
    for name, (path, words) in refusals.items():
        response = add(name, path)
        assert response.status_code == 400, (name, response.text)
        assert words in response.json()["error"]["message"], name
    names = [a["name"] for a in ort_bert.get("/admin/adapters", headers=ADMIN).json()]
    assert sorted(names) == ["int8", "three", "two"]
    assert ort_bert.post("/v1/unload_lora_adapter", json={"lora_name": "int8"}, headers=ADMIN).status_code == 200


def test_session_lru_is_bounded(tmp_path, tiny_exports):
    config = _config(tmp_path, {"two": tiny_exports["two"], "three": tiny_exports["three"]}, max_cpu_loras=1)
    with TestClient(create_app(config)) as client:
        first = {}
        for name in ("two", "three", "two", "three", "two"):
            response = client.post("/v1/classify", json={"model": name, "input": TEXTS})
            assert response.status_code == 200
            first.setdefault(name, response.json()["data"])
            assert response.json()["data"] == first[name]  # a re-read export answers the same
        state = client.app.state.loraplex
        assert state.registry.resident_count() == 1
        assert state.registry.stats.evictions >= 4
        metrics = client.get("/metrics").text
    loads = next(line for line in metrics.splitlines() if line.startswith("loraplex_onnx_session_loads_total"))
    assert float(loads.split()[-1]) == 5  # each request after an eviction opened a fresh session
    assert "loraplex_onnx_sessions_open" in metrics


def _peft_greedy(tiny_llama_dir: Path, adapter: Path, prompt_ids: list[int], max_new: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_completion_equals_peft(ort_llama, tiny_llama_dir, tiny_export_adapters):
    body = {"model": "chat", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    response = ort_llama.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected = _peft_greedy(tiny_llama_dir, tiny_export_adapters["chat"], prompt_ids, 12)
    assert data["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert data["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 12,
                             "total_tokens": len(prompt_ids) + 12}
    assert data["choices"][0]["finish_reason"] == "length"


def test_stream_equals_non_stream_and_seeded_sampling_repeats(ort_llama):
    body = {"model": "chat", "prompt": PROMPT, "max_tokens": 10, "temperature": 0.8, "seed": 7, "ignore_eos": True}
    plain = ort_llama.post("/v1/completions", json=body).json()
    assert plain["usage"]["completion_tokens"] == 10
    again = ort_llama.post("/v1/completions", json=body).json()
    assert again["choices"][0]["text"] == plain["choices"][0]["text"]
    with ort_llama.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}}) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == plain["choices"][0]["text"] and chunks[-1]["usage"] == plain["usage"]


def test_chat_and_refusals_on_the_completion_server(ort_llama, tiny_llama_dir):
    chat = ort_llama.post("/v1/chat/completions", json={
        "model": "chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    base = ort_llama.post("/v1/completions", json={"model": tiny_llama_dir.name, "prompt": "hi"})
    assert base.status_code == 400 and "has no export here" in base.json()["error"]["message"]
    wrong_task = ort_llama.post("/v1/classify", json={"model": "chat", "input": "hi"})
    assert wrong_task.status_code == 400 and "completion adapter" in wrong_task.json()["error"]["message"]
    too_long = ort_llama.post("/v1/completions", json={"model": "chat", "prompt": "hi", "max_tokens": 500})
    assert too_long.status_code == 400
    metrics = ort_llama.get("/metrics").text
    assert 'loraplex_time_to_first_token_seconds_count{adapter="chat"}' in metrics
    assert 'loraplex_batch_size_count{phase="decode"}' in metrics


def test_config_refusals(tmp_path, tiny_exports):
    with pytest.raises(ValueError, match="needs --base NAME or at least one --adapter"):
        ServerConfig(backend="onnxruntime")
    with pytest.raises(ValueError, match="--merge"):
        ServerConfig(backend="onnxruntime", base="minilm-l6", merge=True)
    assert ServerConfig().base == "smollm2-135m"  # the torch backend keeps its default base
    assert main(["serve", "--backend", "onnxruntime"]) == EXIT_USAGE
