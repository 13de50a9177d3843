"""Every method end to end (`training METHOD` on the tiny BERT): the folder's manifest names the method; the
server serves LoRA, QLoRA, IA3 and freeze classifiers with the probabilities the training side's own reload of
the folder computes, refuses prompt-learning classifiers (completion only) and full fine-tunes (a base, not an
adapter) by name with a 400 from add-adapter; the method options' validation and their CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapters import AdapterFormatError, read_adapter_folder
from adapters.manifest import COMPLETION_ONLY_METHODS, SERVED_METHODS
from training.cli import USAGE_ERROR, main
from training.config import METHODS, TrainConfig
from training.errors import ConfigError
from training.output import TrainResult
from training.runner import run_training
from tests.training.conftest import tiny_config

STEPS = 3
METHOD_OPTIONS = {"prompt": {"num_virtual_tokens": 4}, "prefix": {"num_virtual_tokens": 4, "prefix_hidden_size": 16},
                  "ptuning": {"num_virtual_tokens": 4}, "freeze": {"freeze_last_k": 1}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, sentiment_csv: Path) -> dict[str, TrainResult]:
    root = tmp_path_factory.mktemp("method-runs")
    return {
        method: run_training(tiny_config(tiny_bert_dir, sentiment_csv, root / method, method=method, max_steps=STEPS,
                                         **METHOD_OPTIONS.get(method, {})), progress=False)
        for method in METHODS
    }


@pytest.mark.parametrize("method", METHODS)
def test_manifest_names_the_method_and_its_figures(method: str, runs: dict[str, TrainResult]) -> None:
    manifest = runs[method].manifest
    assert manifest.method == method and manifest.train_config["method"] == method
    assert manifest.task == "classification" and manifest.labels == ("neg", "pos")
    assert manifest.metrics["trainable_parameters"] > 0
    assert {"accuracy", "f1_macro"} <= set(manifest.metrics["held_out"])


def test_trainable_parameter_counts_follow_the_method(runs: dict[str, TrainResult]) -> None:
    count = {method: run.manifest.metrics["trainable_parameters"] for method, run in runs.items()}
    assert count["full"] > count["freeze"] > count["lora"] > count["ia3"]
    assert count["prefix"] > count["ptuning"]  # the reparameterisation MLP trains too (only its output is saved)
    assert count["lora"] == count["qlora"]


@pytest.mark.parametrize("method", METHODS)
def test_the_server_reader_serves_every_method_but_full_and_completion_only_ones(
        method: str, runs: dict[str, TrainResult]) -> None:
    if method in SERVED_METHODS and method not in COMPLETION_ONLY_METHODS:
        assert read_adapter_folder(runs[method].out).manifest.method == method
        return
    with pytest.raises(AdapterFormatError) as refused:
        read_adapter_folder(runs[method].out)
    if method in COMPLETION_ONLY_METHODS:  # served per request for completion; these runs are classifiers
        assert str(refused.value) == (f"method {method!r} adapters are served for completion only; "
                                      "this one is for classification")
    else:
        assert method == "full" and "complete models, not adapters: serve one as the base" in str(refused.value)


EXACT_METHODS = ("lora", "ia3", "freeze")  # qlora trained on a 4-bit base; the server runs the full-precision one


def test_served_classifiers_equal_the_training_sides_reload_of_their_folder(
        tiny_bert_dir: Path, runs: dict[str, TrainResult]) -> None:
    """One mixed batch (a row per method) through the server's engine vs `reload_trained` (training's own
    reading of each folder onto a fresh HF model): the same probabilities."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapters import PreparedBase, validate_against_base
    from adapters.fingerprint import fingerprint_base_folder
    from server.engine.base_model import load_base
    from server.engine.classify import classify_rows
    from server.engine.loaded import load_adapter
    from tests.server.conftest import CPU_FP32
    from training.methods import reload_trained

    base = load_base(PreparedBase(tiny_bert_dir.name, tiny_bert_dir, fingerprint_base_folder(tiny_bert_dir)), CPU_FP32)
    loaded = []
    for method in EXACT_METHODS:
        folder = read_adapter_folder(runs[method].out)
        validate_against_base(folder, base.signature)
        loaded.append(load_adapter(method, 1, folder, CPU_FP32.device, CPU_FP32.dtype))
    texts = ["a warm and funny film", "dull, slow and far too long", "not bad at all"]
    rows = [loaded[i % len(loaded)] for i in range(len(texts) * len(loaded))]
    inputs = [texts[i // len(loaded)] for i in range(len(rows))]
    served = classify_rows(base, inputs, rows, max_length=32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    for method in EXACT_METHODS:
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        reference = reload_trained(model, method, runs[method].out)
        for text, adapter, result in zip(inputs, rows, served):
            if adapter.name != method:
                continue
            with torch.no_grad():
                probs = torch.softmax(reference(**tokenizer([text], return_tensors="pt")).logits[0], dim=-1)
            torch.testing.assert_close(torch.tensor([result.probs[label] for label in ("neg", "pos")]), probs,
                                       atol=1e-5, rtol=1e-4)


def test_add_adapter_serves_ia3_and_freeze_and_answers_400_for_full(
    tmp_path: Path, tiny_bert_dir: Path, runs: dict[str, TrainResult]
) -> None:
    from adapters.fingerprint import fingerprint_base_folder
    from adapters import PreparedBase
    from server.api.app import create_app
    from server.config import ServerConfig
    from server.engine.base_model import load_base
    from tests.server.conftest import ADMIN, CPU_FP32

    base = load_base(PreparedBase(tiny_bert_dir.name, tiny_bert_dir, fingerprint_base_folder(tiny_bert_dir)), CPU_FP32)
    config = ServerConfig(base=str(tiny_bert_dir), served_name="tiny-bert", state_dir=tmp_path / "state",
                          admin_token="test-token", adapter_roots=[tmp_path.parent])  # the session's runs
    with TestClient(create_app(config, base=base)) as client:
        for method in ("prompt", "full"):
            answer = client.post("/v1/load_lora_adapter", headers=ADMIN,
                                 json={"lora_name": method, "lora_path": str(runs[method].out)})
            assert answer.status_code == 400, answer.text
            assert f"method {method!r}" in answer.text
        for method in ("qlora", "ia3", "freeze"):
            served = client.post("/v1/load_lora_adapter", headers=ADMIN,
                                 json={"lora_name": method, "lora_path": str(runs[method].out)})
            assert served.status_code == 200, served.text
            classified = client.post("/v1/classify", json={"model": method, "input": ["great film, loved it", "awful"]})
            assert classified.status_code == 200, classified.text
            assert all(item["label"] in ("neg", "pos") for item in classified.json()["data"])


@pytest.mark.parametrize("overrides, message", [
    ({"method": "prompt", "use_dora": True}, "use_dora applies to method lora or qlora, not 'prompt'"),
    ({"method": "lora", "num_virtual_tokens": 5}, "num_virtual_tokens applies to method prompt or prefix or ptuning"),
    ({"method": "ptuning", "prefix_hidden_size": 8}, "prefix_hidden_size applies to method prefix, not 'ptuning'"),
    ({"method": "full", "freeze_last_k": 1}, "freeze_last_k applies to method freeze, not 'full'"),
    ({"method": "freeze", "freeze_last_k": 1, "trainable_modules": "mlp"}, "not both"),
    ({"method": "freeze", "freeze_last_k": 0}, "freeze_last_k must be a positive integer"),
    ({"method": "prompt", "num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
    ({"method": "qlora", "qlora_quant_type": "int3"}, "qlora_quant_type must be one of nf4, fp4"),
    ({"method": "lora", "use_rslora": "maybe"}, "use_rslora must be true or false"),
    ({"method": "freeze", "trainable_modules": "a,,b"}, "trainable_modules must be non-empty module names"),
])
def test_method_options_are_checked(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(base="b", data="d", out=Path("o"), **overrides)


def test_method_options_survive_the_manifest() -> None:
    config = TrainConfig(base="b", data="d", out=Path("o"), method="freeze", trainable_modules="layers.1.mlp,classifier")
    saved = json.loads(json.dumps(config.to_manifest()))
    assert TrainConfig.from_manifest(saved) == config


def test_cli_trains_a_method_with_its_flags(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path, capsys) -> None:
    out = tmp_path / "ptuning"
    args = ["ptuning", "--base", str(tiny_bert_dir), "--data", str(sentiment_csv), "--out", str(out),
            "--num-virtual-tokens", "3", "--max-steps", "2", "--batch-size", "4", "--val-fraction", "0.25", "--no-progress"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and printed["metrics"]["trainable_parameters"] > 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["num_virtual_tokens"] == 3 and not saved["prefix_projection"]

    rslora = tmp_path / "rslora"
    args = ["lora", "--base", str(tiny_bert_dir), "--data", str(sentiment_csv), "--out", str(rslora), "--use-rslora",
            "--max-steps", "1", "--batch-size", "4", "--lora-r", "2", "--val-fraction", "0.25", "--no-progress"]
    assert main(args) == 0
    assert json.loads((rslora / "adapter_config.json").read_text())["use_rslora"] is True


def test_cli_refuses_an_option_of_another_method(tmp_path: Path, capsys) -> None:
    assert main(["prompt", "--base", "b", "--data", "d", "--out", str(tmp_path), "--use-dora"]) == USAGE_ERROR
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "training: error: use_dora applies to method lora or qlora, not 'prompt'")


def test_a_full_fine_tune_serves_as_the_base_and_classifies_under_its_id(
        tmp_path: Path, runs: dict[str, TrainResult]) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from server.api.app import create_app
    from server.config import ServerConfig

    folder = runs["full"].out
    config = ServerConfig(base=str(folder), served_name="tuned", state_dir=tmp_path / "state", admin_token="test-token",
                          device="cpu", dtype="float32")
    texts = ["a warm and funny film", "dull, slow and far too long"]
    with TestClient(create_app(config)) as client:
        answer = client.post("/v1/classify", json={"model": "tuned", "input": texts})
    assert answer.status_code == 200, answer.text
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = torch.softmax(model(**AutoTokenizer.from_pretrained(folder)(texts, padding=True,
                                                                            return_tensors="pt")).logits, dim=-1)
    served = torch.tensor([[item["probs"][label] for label in ("neg", "pos")] for item in answer.json()["data"]])
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-4)


def test_a_plain_base_still_has_no_head(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from server.api.app import create_app
    from server.config import ServerConfig

    config = ServerConfig(base=str(tiny_bert_dir), served_name="plain", state_dir=tmp_path / "state",
                          admin_token="test-token", device="cpu", dtype="float32")
    with TestClient(create_app(config)) as client:
        answer = client.post("/v1/classify", json={"model": "plain", "input": "fine"})
    assert answer.status_code == 400 and "has no classification head" in answer.text
