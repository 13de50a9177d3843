"""/v1/classify on the tiny BERT: per-adapter heads and label sets, probabilities equal PEFT's."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

TEXTS = ["a wonderful, moving film", "dull and far too long", "meh"]


@pytest.mark.parametrize("name,num_labels", [("two", 2), ("three", 3)])
def test_probs_match_peft(bert_client, tiny_bert_dir, tiny_classifiers, name, num_labels):
    response = bert_client.post("/v1/classify", json={"model": name, "input": TEXTS})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=num_labels)
    model = PeftModel.from_pretrained(model, tiny_classifiers[name]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        ref = torch.softmax(model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits, -1)
    for row, expected in zip(data, ref):
        assert len(row["probs"]) == num_labels
        got = torch.tensor([row["probs"][f"LABEL_{i}"] for i in range(num_labels)])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        assert row["label"] == f"LABEL_{int(expected.argmax())}"


def test_single_string_input_and_usage(bert_client):
    data = bert_client.post("/v1/classify", json={"model": "two", "input": "great"}).json()
    assert len(data["data"]) == 1 and data["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize("body,status", [
    ({"model": "tiny-bert", "input": "x"}, 400),
    ({"model": "nope", "input": "x"}, 404),
    ({"model": "two", "input": []}, 400),
    ({"model": "two", "input": [""]}, 400),
    ({"model": "two", "input": ["x"] * 65}, 400),
    ({"model": "two"}, 400),
])
def test_bad_classify_requests(bert_client, body, status):
    assert bert_client.post("/v1/classify", json=body).status_code == status
    assert bert_client.post("/v1/classify", json={"model": "two", "input": "ok"}).status_code == 200


def test_encoder_base_refuses_completions(bert_client):
    response = bert_client.post("/v1/completions", json={"model": "tiny-bert", "prompt": "hi"})
    assert response.status_code == 400 and "classify" in response.json()["error"]["message"]


def test_mixed_classifiers_in_one_forward_equal_each_alone(tiny_bert_base, tiny_classifiers):
    from adapters import read_adapter_folder
    from server.engine.classify import classify_rows, classify_texts
    from server.engine.loaded import load_adapter
    from tests.server.conftest import CPU_FP32

    two, three = (load_adapter(n, 1, read_adapter_folder(tiny_classifiers[n]), CPU_FP32.device, CPU_FP32.dtype)
                  for n in ("two", "three"))
    mixed = classify_rows(tiny_bert_base, TEXTS, [two, three, two], 64)
    alone = classify_texts(tiny_bert_base, TEXTS, two, 64)
    alone3 = classify_texts(tiny_bert_base, TEXTS[1:2], three, 64)
    assert len(mixed[1].probs) == 3 and len(mixed[0].probs) == 2
    for got, want in [(mixed[0], alone[0]), (mixed[2], alone[2]), (mixed[1], alone3[0])]:
        assert got.label == want.label
        for label, p in want.probs.items():
            assert abs(got.probs[label] - p) < 1e-5


def test_concurrent_requests_for_different_classifiers(bert_client):
    from concurrent.futures import ThreadPoolExecutor

    def call(name):
        return bert_client.post("/v1/classify", json={"model": name, "input": TEXTS}).json()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, ["two", "three", "two", "three"]))
    assert [len(r["data"][0]["probs"]) for r in results] == [2, 3, 2, 3]
    for a, b in zip(results[0]["data"], results[2]["data"]):  # batched with others or not: same answer
        assert a["label"] == b["label"]
        assert all(abs(a["probs"][k] - b["probs"][k]) < 1e-5 for k in a["probs"])
