"""The onnxruntime backend serving exports of the shipped example adapters, through the HTTP API, checked
against torch (PEFT, unmerged) independently of the export's own parity report."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel

from server.api.app import create_app
from server.config import ServerConfig
from tests.conftest import EXAMPLE_ADAPTERS
from training.data import load_dataset, split_dataset
from training.evaluate import relabel
from training.models import load_causal_lm, load_sequence_classifier, load_tokenizer

pytestmark = pytest.mark.integration

LABELS = ("rotten", "fresh")
HELD_OUT_ROWS = 2048
CHECK_ROWS = 64  # one /v1/classify request holds at most 64 inputs
FP32_TOLERANCE = 1e-4
QUESTION = "What is a computer virus?"
MAX_TOKENS = 24


def _client(tmp_path, name, export) -> TestClient:
    config = ServerConfig(backend="onnxruntime", adapters={name: str(export)}, state_dir=tmp_path / "state",
                          admin_token="test-token", classify_max_length=64)
    return TestClient(create_app(config))


def test_sentiment_export_probs_equal_torch(tmp_path, sentiment_onnx_export, minilm_base):
    dataset = relabel(load_dataset("rotten-tomatoes", "classification"), LABELS)
    texts = [r.text for r in split_dataset(dataset, 0.16, 0, HELD_OUT_ROWS).validation.examples[:CHECK_ROWS]]
    with _client(tmp_path, "sentiment", sentiment_onnx_export) as client:
        response = client.post("/v1/classify", json={"model": "sentiment", "input": texts})
    assert response.status_code == 200, response.text
    got = torch.tensor([[row["probs"][label] for label in LABELS] for row in response.json()["data"]])
    tokenizer = load_tokenizer(minilm_base.path)
    model = load_sequence_classifier(minilm_base, LABELS, tokenizer.pad_token_id)
    model = PeftModel.from_pretrained(model, EXAMPLE_ADAPTERS / "sentiment").eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(model(**batch).logits, -1)
    torch.testing.assert_close(got, expected, atol=FP32_TOLERANCE, rtol=0)


def test_tech_export_greedy_chat_equals_torch(tmp_path, tech_onnx_export, smollm2_base):
    messages = [{"role": "user", "content": QUESTION}]
    with _client(tmp_path, "chatbot-tech", tech_onnx_export) as client:
        response = client.post("/v1/chat/completions", json={
            "model": "chatbot-tech", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["message"]["content"]
    tokenizer = load_tokenizer(smollm2_base.path)
    model = PeftModel.from_pretrained(load_causal_lm(smollm2_base), EXAMPLE_ADAPTERS / "chatbot-tech").eval()
    ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text == expected and "virus" in text.lower()
