"""A merged export of a classification adapter, served as the base, classifies under the base's own id with
the probabilities the adapter gives on its original base (`server serve --base DIR`)."""

from __future__ import annotations

from pathlib import Path

import torch
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import ServerConfig

TEXTS = ["a warm and funny film", "dull, slow and far too long", "fine"]


def _probs(client: TestClient, model: str) -> torch.Tensor:
    answer = client.post("/v1/classify", json={"model": model, "input": TEXTS})
    assert answer.status_code == 200, answer.text
    return torch.tensor([list(item["probs"].values()) for item in answer.json()["data"]])


def test_merged_classifier_as_the_base_equals_the_adapter_on_its_base(tmp_path: Path, tiny_bert_dir: Path,
                                                                       tiny_exports, tiny_export_adapters):
    common = dict(admin_token="test-token", device="cpu", dtype="float32")
    merged = ServerConfig(base=str(tiny_exports["two-merged"]), served_name="merged", state_dir=tmp_path / "a", **common)
    with TestClient(create_app(merged)) as client:
        served = _probs(client, "merged")
    plain = ServerConfig(base=str(tiny_bert_dir), served_name="plain", state_dir=tmp_path / "b",
                         adapters={"two": str(tiny_export_adapters["two"])}, **common)
    with TestClient(create_app(plain)) as client:
        expected = _probs(client, "two")
        assert client.post("/v1/classify", json={"model": "plain", "input": "x"}).status_code == 400  # no head
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-4)
