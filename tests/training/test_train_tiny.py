"""A few training steps on the tiny random bases: loss falls, the folder is what the server and PEFT read,
the manifest carries the figures, and `training eval` reproduces them from the folder alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from adapters import WEIGHTS_FILE, read_adapter_folder, read_manifest
from adapters.fingerprint import fingerprint_base_folder
from training.evaluate import evaluate_adapter
from training.output import TrainResult
from training.runner import run_training
from tests.training.conftest import tiny_config

DECODER_MODULES_PER_LAYER = 4  # q_proj, k_proj, v_proj, o_proj
TINY_LAYERS = 2


@pytest.fixture(scope="module")
def completion_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, qa_jsonl: Path) -> TrainResult:
    out = tmp_path_factory.mktemp("runs") / "qa-adapter"
    return run_training(tiny_config(tiny_llama_dir, qa_jsonl, out), progress=False)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, sentiment_csv: Path) -> TrainResult:
    out = tmp_path_factory.mktemp("runs") / "sentiment-adapter"
    return run_training(tiny_config(tiny_bert_dir, sentiment_csv, out), progress=False)


def test_completion_training_lowers_the_loss(completion_run: TrainResult) -> None:
    train = completion_run.manifest.metrics["train"]
    assert train["loss_last"] < train["loss_first"]
    held_out = completion_run.manifest.metrics["held_out"]
    assert held_out["adapter"]["loss"] < held_out["base"]["loss"]
    assert held_out["rows"] == 6 and held_out["answer_tokens"] > 0


def test_completion_folder_is_what_the_server_reads(completion_run: TrainResult, tiny_llama_dir: Path) -> None:
    folder = read_adapter_folder(completion_run.out)
    assert folder.task == "completion" and folder.spec.r == 4
    assert len(folder.lora) == DECODER_MODULES_PER_LAYER * TINY_LAYERS and not folder.extra
    manifest = folder.manifest
    assert manifest.base_fingerprint == fingerprint_base_folder(tiny_llama_dir)
    assert manifest.train_config["task"] == "completion"
    assert manifest.train_config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert manifest.train_config["max_length"] == 256
    assert set(manifest.files) == {"adapter_config.json", WEIGHTS_FILE}
    assert not any(p.name.startswith(".") for p in completion_run.out.parent.iterdir()), "no temp folder left"


def test_completion_adapter_loads_in_peft_and_changes_the_output(completion_run: TrainResult, tiny_llama_dir: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    before = base(ids).logits
    adapted = PeftModel.from_pretrained(base, str(completion_run.out)).eval()
    assert not torch.allclose(adapted(ids).logits, before)


def test_eval_reproduces_the_manifest_figures(completion_run: TrainResult) -> None:
    result = evaluate_adapter(completion_run.out)
    assert result["task"] == "completion" and result["split"] == "validation"
    assert result["held_out"] == completion_run.manifest.metrics["held_out"]


def test_classifier_training_writes_head_labels_and_figures(classifier_run: TrainResult) -> None:
    folder = read_adapter_folder(classifier_run.out)
    assert folder.task == "classification" and folder.labels == ("neg", "pos")
    assert folder.extra["classifier.weight"].shape == (2, 64) and folder.extra["classifier.bias"].shape == (2,)
    metrics = classifier_run.manifest.metrics
    assert metrics["train"]["loss_last"] < metrics["train"]["loss_first"]
    held_out = metrics["held_out"]
    assert {"accuracy", "precision_macro", "recall_macro", "f1_macro", "per_class", "confusion_matrix"} <= set(held_out)
    assert held_out["rows"] == 10 and held_out["accuracy"] > held_out["majority_baseline_accuracy"]


def test_classifier_loads_in_peft_with_its_head(classifier_run: TrainResult, tiny_bert_dir: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    adapted = PeftModel.from_pretrained(model, str(classifier_run.out))
    saved = load_file(str(classifier_run.out / WEIGHTS_FILE))["base_model.model.classifier.weight"]
    head = adapted.base_model.model.classifier.modules_to_save["default"].weight
    assert torch.equal(head, saved)


def test_classifier_eval_reproduces_the_manifest_figures(classifier_run: TrainResult) -> None:
    assert evaluate_adapter(classifier_run.out)["held_out"] == classifier_run.manifest.metrics["held_out"]


def test_eval_on_every_row_of_another_file(classifier_run: TrainResult, tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("text,label\nloved it,pos\nhated it,neg\ngreat,pos\n")
    result = evaluate_adapter(classifier_run.out, data=str(other), split="all")
    assert result["held_out"]["rows"] == 3 and result["held_out"]["labels"] == ["neg", "pos"]


def test_same_seed_same_adapter(tmp_path: Path, tiny_llama_dir: Path, qa_jsonl: Path) -> None:
    runs = [run_training(tiny_config(tiny_llama_dir, qa_jsonl, tmp_path / name, max_steps=2, grad_accum_steps=2,
                                     lora_dropout=0.1), progress=False) for name in ("a", "b")]
    first, second = (load_file(str(r.out / WEIGHTS_FILE)) for r in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert read_manifest(runs[0].out).metrics["train"]["rows_seen"] == 2 * 2 * 4  # steps x micro-batches x rows
