"""`training export --format int8|int4` on the tiny bases: the quantized checkpoint folder (quantization.json,
files, manifest), its parity figures reproduced from the folder alone, --base-only, atomic writes, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from adapters import read_export_folder
from adapters.export_manifest import EXPORT_MANIFEST_FILE, PARITY_FILE
from adapters.fingerprint import fingerprint_base_folder
from adapters.quantized import (QUANT_CONFIG_FILE, QUANT_WEIGHTS_FILE, dequantized_state_dict, load_quantized,
                                quantized_parameter_names)
from tests.conftest import TINY_LABELS, export_folder
from tests.training.conftest import tiny_config
from training.cli import USAGE_ERROR, main
from training.errors import ConfigError
from training.export import parity
from training.export.heldout_text import held_out_text
from training.export.options import ExportOptions

TINY_TEXT_TOKENS = 512  # two windows of 256: enough to compare figures, quick on 2 cores
SMALL = dict(perplexity_tokens=TINY_TEXT_TOKENS, parity_prompts=2, parity_tokens=4, parity_rows=8)
FIGURE_TOLERANCE = 1e-4  # relative: the report rounds to 6 significant digits


def _parity(folder: Path) -> dict:
    return json.loads((folder / PARITY_FILE).read_text())


@pytest.fixture(scope="module")
def int_exports(tmp_path_factory: pytest.TempPathFactory, tiny_export_adapters: dict[str, Path],
                tiny_llama_dir: Path, tiny_bert_dir: Path) -> dict[str, Path]:
    """int8 / int4 of the tiny chat adapter, its base alone in int4, and the tiny classifier `two` in int8."""
    root = tmp_path_factory.mktemp("int-exports")
    chat, llama, bert = tiny_export_adapters["chat"], str(tiny_llama_dir), str(tiny_bert_dir)
    return {
        "int8": export_folder(chat, root / "chat-int8", base=llama, format="int8", **SMALL),
        "int4": export_folder(chat, root / "chat-int4", base=llama, format="int4", **SMALL),
        "base-int4": export_folder(chat, root / "base-int4", base=llama, format="int4", base_only=True, **SMALL),
        "two-int8": export_folder(tiny_export_adapters["two"], root / "two-int8", base=bert, format="int8", **SMALL),
    }


def _merged_chat(tiny_llama_dir: Path, adapter: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def _model_from_folder(folder: Path, model_class=AutoModelForCausalLM) -> tuple[torch.nn.Module, set[str]]:
    """The model built from config.json with the folder's tensors loaded (quantized ones dequantized), as a
    loader would, and the state-dict keys the folder did not provide."""
    config, plain, weights = load_quantized(folder)
    model = model_class.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    result = model.load_state_dict({**plain, **dequantized_state_dict(weights)}, strict=False)
    assert not result.unexpected_keys
    return model, set(result.missing_keys)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_folder_manifest_and_quantization_settings(int_exports, tiny_llama_dir: Path, method: str) -> None:
    folder = int_exports[method]
    manifest = read_export_folder(folder)
    assert manifest.format == method and manifest.quantize == method and manifest.model_file == QUANT_WEIGHTS_FILE
    assert manifest.task == "completion" and manifest.adapter_name == "chat" and manifest.adapter_rank == 4
    assert manifest.base_fingerprint == fingerprint_base_folder(tiny_llama_dir)
    assert {QUANT_WEIGHTS_FILE, QUANT_CONFIG_FILE, PARITY_FILE, "config.json", "tokenizer.json"} <= set(manifest.files)
    assert set(manifest.files) == {p.name for p in folder.iterdir()} - {EXPORT_MANIFEST_FILE}
    config, plain, weights = load_quantized(folder)
    assert config.method == method and config.merged_adapter == "chat"
    assert config.source_fingerprint == manifest.base_fingerprint and config.tied == {"lm_head": "model.embed_tokens"}
    kinds = set(config.modules.values())
    assert kinds == {method, "int8", "int8_channel"}  # k/v [32, 64] rows do not fit the group kernels' blocks
    assert config.modules["model.embed_tokens"] == "int8"
    expected = set(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict())
    assert set(plain) | quantized_parameter_names(config) == expected  # every key the server's model class has
    assert manifest.settings["modules"] == {k: list(config.modules.values()).count(k) for k in sorted(kinds)}
    figures = _parity(folder)[method]
    assert manifest.parity[method]["next_token_agreement"] == figures["next_token_agreement"]
    assert figures["tokens"] == TINY_TEXT_TOKENS - 2 and figures["greedy_identical"].endswith("/2")
    assert figures["adapter_delta_kept"] > 0.9  # random tiny weights: the adapter's change survives


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_folder_alone_reproduces_the_parity_figures(int_exports, tiny_export_adapters, tiny_llama_dir: Path,
                                                    method: str) -> None:
    """Not the report's word for it: the merged PEFT model and the model rebuilt from the folder, here."""
    folder = int_exports[method]
    figures = _parity(folder)[method]
    quantized, missing = _model_from_folder(folder)
    assert not missing
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = held_out_text(tokenizer, TINY_TEXT_TOKENS).windows  # a stock PEFT adapter: no rows left out
    reference = parity.next_tokens(_merged_chat(tiny_llama_dir, tiny_export_adapters["chat"]), windows)
    got = parity.next_tokens(quantized, windows)
    assert reference.perplexity == pytest.approx(figures["reference_perplexity"], rel=FIGURE_TOLERANCE)
    assert got.perplexity == pytest.approx(figures["perplexity"], rel=FIGURE_TOLERANCE)
    assert (got.predicted == reference.predicted).mean() == pytest.approx(figures["next_token_agreement"], abs=1e-6)


def test_base_only_leaves_the_adapter_out(int_exports, tiny_export_adapters, tiny_llama_dir: Path) -> None:
    folder = int_exports["base-int4"]
    manifest = read_export_folder(folder)
    assert manifest.adapter_name == "" and manifest.adapter_digest == "" and manifest.settings["base_only"]
    config, _, weights = load_quantized(folder)
    assert config.merged_adapter == ""
    dequantized = dequantized_state_dict(weights)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    merged = _merged_chat(tiny_llama_dir, tiny_export_adapters["chat"]).state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):  # adapted ones
        to_base = torch.linalg.norm(dequantized[name] - base[name])
        assert to_base < 0.25 * torch.linalg.norm(dequantized[name] - merged[name])
    assert _parity(folder)["base_only"] and "adapter_delta_kept" not in _parity(folder)["int4"]


def test_classifier_int8_keeps_its_head_and_labels(int_exports, tiny_export_adapters, tiny_bert_dir: Path) -> None:
    folder = int_exports["two-int8"]
    manifest = read_export_folder(folder)
    assert manifest.task == "classification" and manifest.labels == TINY_LABELS
    assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    config, plain, _ = load_quantized(folder)
    assert {"classifier.weight", "classifier.bias"} <= set(plain) and "classifier" not in config.modules
    report = _parity(folder)
    assert report["source"] == "probe texts" and report["int8"]["argmax_agreement"] >= 0.75  # random tiny weights
    model, missing = _model_from_folder(folder, AutoModelForSequenceClassification)
    assert not missing and model.config.num_labels == 2
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    reference = PeftModel.from_pretrained(reference, tiny_export_adapters["two"]).eval()
    batch = AutoTokenizer.from_pretrained(folder)(["a wonderful film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=0.1, rtol=0.1)


def test_base_only_encoder_holds_no_head(tiny_export_adapters, tiny_bert_dir: Path, tmp_path: Path) -> None:
    folder = export_folder(tiny_export_adapters["two"], tmp_path / "bert-int8", base=str(tiny_bert_dir),
                           format="int8", base_only=True, **SMALL)
    manifest = read_export_folder(folder)
    assert manifest.task == "classification" and manifest.labels == ()
    with safe_open(str(folder / QUANT_WEIGHTS_FILE), framework="pt") as reader:
        assert not any(key.startswith("classifier.") for key in reader.keys())
    report = _parity(folder)
    assert report["head"].startswith("placeholder") and "accuracy" not in report["int8"]


def test_failed_export_leaves_nothing(tiny_export_adapters, tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import training.export.quantized_export as quantized_export

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(quantized_export, "save_quantized", broken)
    out = tmp_path / "exports" / "chat-int8"
    with pytest.raises(RuntimeError, match="disk full"):
        export_folder(tiny_export_adapters["chat"], out, base=str(tiny_llama_dir), format="int8", **SMALL)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_refusals(tiny_export_adapters, tmp_path: Path) -> None:
    adapter = tiny_export_adapters["chat"]
    for fmt in ("onnx", "merged"):
        with pytest.raises(ConfigError, match="--base-only applies to --format int8 or int4"):
            ExportOptions(adapter_dir=adapter, out=tmp_path / "x", format=fmt, base_only=True)
    with pytest.raises(ConfigError, match="--quantize applies to --format onnx only"):
        ExportOptions(adapter_dir=adapter, out=tmp_path / "x", format="int4", quantize="int8")
    with pytest.raises(ConfigError, match="perplexity-tokens must be a positive integer"):
        ExportOptions(adapter_dir=adapter, out=tmp_path / "x", format="int8", perplexity_tokens=0)


def test_prompt_learning_folder_is_refused(tiny_llama_dir: Path, qa_jsonl: Path, tmp_path: Path, capsys) -> None:
    from training.runner import run_training

    run = run_training(tiny_config(tiny_llama_dir, qa_jsonl, tmp_path / "prompt", method="prompt", max_steps=2,
                                   num_virtual_tokens=2), progress=False)
    with pytest.raises(ConfigError, match="a 'prompt' folder cannot be merged into its base"):
        export_folder(run.out, tmp_path / "x", format="int4")
    assert main(["export", str(run.out), "--format", "int8", "--out", str(tmp_path / "y")]) == USAGE_ERROR
    assert "changes no weight" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
