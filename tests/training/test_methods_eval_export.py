"""`training eval` and `training export` on every method's folder (tiny bases): eval rebuilds the figures training
wrote into the manifest; export folds IA3, DoRA, freeze and full folders into a merged model (and ONNX from it),
and refuses prompt-learning folders, which have nothing to merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from adapters import read_export_folder, resolve_base
from adapters.export_manifest import PARITY_FILE
from tests.conftest import export_folder
from training.cli import USAGE_ERROR, main
from training.config import METHODS
from training.errors import ConfigError
from training.evaluate import evaluate_adapter
from training.models import load_tokenizer
from training.output import TrainResult
from training.runner import run_training
from training.trained_folder import load_trained, read_trained_folder, task_model
from tests.training.conftest import tiny_config

STEPS = 3
METHOD_OPTIONS = {"prompt": {"num_virtual_tokens": 4}, "prefix": {"num_virtual_tokens": 4, "prefix_hidden_size": 16},
                  "ptuning": {"num_virtual_tokens": 4}, "freeze": {"freeze_last_k": 1}}
MERGED_TOLERANCE = 1e-5
TEXTS = ["a wonderful, moving film", "dull and far too long", "meh"]
Train = Callable[..., TrainResult]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_bert_dir: Path, qa_jsonl: Path,
            sentiment_csv: Path) -> Train:
    """train(method, task, **overrides): a few steps of `method` on the tiny base for `task`, run once per module."""
    root = tmp_path_factory.mktemp("methods")
    runs: dict[tuple, TrainResult] = {}

    def train(method: str, task: str, **overrides) -> TrainResult:
        key = (method, task, tuple(sorted(overrides.items())))
        if key not in runs:
            base, data = (tiny_llama_dir, qa_jsonl) if task == "completion" else (tiny_bert_dir, sentiment_csv)
            out = root / f"{method}-{task}-{len(runs)}"
            config = tiny_config(base, data, out, method=method, max_steps=STEPS, **METHOD_OPTIONS.get(method, {}),
                                 **overrides)
            runs[key] = run_training(config, progress=False)
        return runs[key]

    return train


@pytest.mark.parametrize("task", ["classification", "completion"])
@pytest.mark.parametrize("method", METHODS)
def test_eval_rebuilds_every_methods_figures(trained: Train, method: str, task: str) -> None:
    run = trained(method, task)
    result = evaluate_adapter(run.out)
    assert result["method"] == method and result["task"] == task
    assert result["held_out"] == run.manifest.metrics["held_out"]


def test_eval_of_a_dora_folder(trained: Train) -> None:
    run = trained("lora", "classification", use_dora=True)
    assert json.loads((run.out / "adapter_config.json").read_text())["use_dora"] is True
    assert evaluate_adapter(run.out)["held_out"] == run.manifest.metrics["held_out"]


def _reference(folder: Path, cache_dir: Path) -> torch.nn.Module:
    """The folder's model as eval loads it (PEFT unmerged, or freeze's / full's HF model)."""
    trained_folder = read_trained_folder(folder)
    base = resolve_base(trained_folder.base_ref(), cache_dir)
    return task_model(load_trained(trained_folder, base, load_tokenizer(base.path), trained_folder.labels))


@pytest.mark.parametrize("method, task, overrides", [
    ("ia3", "classification", {}),
    ("freeze", "classification", {}),
    ("full", "classification", {}),
    ("lora", "classification", {"use_dora": True}),
    ("ia3", "completion", {}),
    ("freeze", "completion", {}),
])
def test_merged_export_of_other_methods(trained: Train, tmp_path: Path, cache_dir: Path, method: str, task: str,
                                        overrides: dict) -> None:
    run = trained(method, task, **overrides)
    out = export_folder(run.out, tmp_path / "merged", format="merged", parity_tokens=4)
    manifest = read_export_folder(out)
    assert manifest.format == "merged" and manifest.task == task and manifest.settings["adapter_method"] == method
    assert manifest.adapter_rank == (4 if method == "lora" else 0) and len(manifest.adapter_digest) == 64
    parity = json.loads((out / PARITY_FILE).read_text())
    assert parity["method"] == method and parity["source"].startswith("held-out rows of")
    reference = _reference(run.out, cache_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    if task == "classification":
        assert parity["merged_torch"]["max_abs_diff"] <= MERGED_TOLERANCE
        merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
        assert merged.config.id2label == {0: "neg", 1: "pos"}
        batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    else:
        assert parity["merged_torch"]["all_greedy_identical"]
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():  # not the report's word for it: the merged folder against the unmerged model
        torch.testing.assert_close(merged(**batch).logits, reference(**batch).logits, atol=MERGED_TOLERANCE, rtol=1e-4)


def test_onnx_export_of_a_full_folder(trained: Train, tmp_path: Path) -> None:
    run = trained("full", "completion")
    out = export_folder(run.out, tmp_path / "full-onnx", parity_tokens=4)
    manifest = read_export_folder(out)
    assert manifest.format == "onnx" and manifest.settings["adapter_method"] == "full"
    assert manifest.parity["onnx_fp32"]["token_agreement"] == 1.0


def test_int8_onnx_export_of_an_ia3_folder(trained: Train, tmp_path: Path) -> None:
    run = trained("ia3", "classification")
    out = export_folder(run.out, tmp_path / "ia3-int8", quantize="int8")
    parity = json.loads((out / PARITY_FILE).read_text())
    assert parity["onnx_fp32"]["max_abs_diff"] <= 1e-4 and parity["onnx_int8"]["argmax_agreement"] >= 0.75


@pytest.mark.parametrize("method, task", [("prompt", "classification"), ("prefix", "completion"),
                                          ("ptuning", "completion")])
def test_prompt_learning_folders_cannot_be_merged(trained: Train, tmp_path: Path, capsys, method: str,
                                                  task: str) -> None:
    run = trained(method, task)
    with pytest.raises(ConfigError, match=f"a '{method}' folder cannot be merged into its base"):
        export_folder(run.out, tmp_path / "x", format="merged")
    assert main(["export", str(run.out), "--out", str(tmp_path / "y")]) == USAGE_ERROR
    assert "changes no weight" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_eval_of_a_freeze_folder(trained: Train, capsys) -> None:
    run = trained("freeze", "classification")
    assert main(["eval", str(run.out), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "freeze" and printed["held_out"] == run.manifest.metrics["held_out"]
