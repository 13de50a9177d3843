"""`training export` mechanics on the tiny bases: folder contents and manifest, parity figures against the
unmerged adapter, INT8, merged folders, atomic writes (a failure leaves nothing), refusals, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from adapters import AdapterFormatError, read_export_folder
from adapters.export_manifest import EXPORT_MANIFEST_FILE, ONNX_MODEL_FILE, PARITY_FILE
from adapters.fingerprint import fingerprint_base_folder
from tests.conftest import TINY_LABELS, export_folder
from training.cli import USAGE_ERROR, main
from training.errors import ConfigError
from training.export.options import ExportOptions

FP32_TOLERANCE = 1e-4
TEXTS = ["a wonderful, moving film", "dull and far too long", "meh"]


def _parity(folder: Path) -> dict:
    return json.loads((folder / PARITY_FILE).read_text())


def test_classifier_export_folder_and_manifest(tiny_exports, tiny_bert_dir):
    folder = tiny_exports["two"]
    manifest = read_export_folder(folder)
    assert manifest.format == "onnx" and manifest.task == "classification" and manifest.quantize == "none"
    assert manifest.base_fingerprint == fingerprint_base_folder(tiny_bert_dir)
    assert manifest.adapter_name == "two" and manifest.adapter_rank == 4 and len(manifest.adapter_digest) == 64
    assert manifest.labels == TINY_LABELS and manifest.model_file == ONNX_MODEL_FILE
    assert {ONNX_MODEL_FILE, PARITY_FILE, "config.json", "tokenizer.json"} <= set(manifest.files)
    assert set(manifest.files) == {p.name for p in folder.iterdir()} - {EXPORT_MANIFEST_FILE}  # no stage left
    assert manifest.settings["optimum_task"] == "text-classification" and manifest.settings["opset"]
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    assert manifest.parity["onnx_fp32"]["max_abs_diff"] <= FP32_TOLERANCE


def test_fp32_parity_on_probe_rows(tiny_exports):
    report = _parity(tiny_exports["two"])
    assert report["source"] == "probe texts" and report["rows"] == 8 and "accuracy" not in report["onnx_fp32"]
    assert report["onnx_fp32"]["max_abs_diff"] <= FP32_TOLERANCE
    assert report["onnx_fp32"]["argmax_agreement"] == 1.0


def test_onnx_logits_equal_peft_independently(tiny_exports, tiny_export_adapters, tiny_bert_dir):
    """Not the report's word for it: the ONNX graph against PEFT's own unmerged model, here."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_exports["three"] / ONNX_MODEL_FILE), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_exports["three"])
    batch = tokenizer(TEXTS, padding=True, return_tensors="np")
    got = session.run(["logits"], {k: v.astype(np.int64) for k, v in batch.items()})[0]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    model = PeftModel.from_pretrained(model, tiny_export_adapters["three"]).eval()
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=FP32_TOLERANCE)
    assert read_export_folder(tiny_exports["three"]).labels == ("LABEL_0", "LABEL_1", "LABEL_2")  # stock PEFT


def test_int8_export(tiny_exports):
    folder = tiny_exports["two-int8"]
    manifest = read_export_folder(folder)
    assert manifest.quantize == "int8" and manifest.settings["quantization"]["bits"] == 8
    report = _parity(folder)
    assert report["onnx_fp32"]["max_abs_diff"] <= FP32_TOLERANCE  # measured before quantizing
    assert report["onnx_int8"]["argmax_agreement"] >= 0.75  # random tiny weights: a loose sanity bound
    assert (folder / ONNX_MODEL_FILE).stat().st_size < (tiny_exports["two"] / ONNX_MODEL_FILE).stat().st_size
    assert "per token" in manifest.settings["quantization"]["method"] and manifest.settings["quantization"]["matmuls"]
    assert manifest.parity["onnx_int8"]["argmax_agreement"] == report["onnx_int8"]["argmax_agreement"]


def test_int8_completion_export_decodes(tiny_export_adapters, tiny_llama_dir, tmp_path):
    """The INT8 rewrite on a decoder graph with a KV cache: optimum's runtime loads it and decodes."""
    folder = export_folder(tiny_export_adapters["chat"], tmp_path / "chat-int8", base=str(tiny_llama_dir),
                           quantize="int8", parity_tokens=8)
    manifest = read_export_folder(folder)
    assert manifest.quantize == "int8" and manifest.task == "completion"
    int8 = _parity(folder)["onnx_int8"]
    assert int8["greedy_identical"].endswith("/4") and 0.0 <= int8["token_agreement"] <= 1.0
    assert np.isfinite(int8["logits_max_abs_diff"])


def test_completion_export_greedy_parity(tiny_exports):
    manifest = read_export_folder(tiny_exports["chat"])
    assert manifest.task == "completion" and manifest.settings["optimum_task"] == "text-generation-with-past"
    report = _parity(tiny_exports["chat"])
    assert report["source"] == "probe prompts" and report["new_tokens"] == 8
    assert report["onnx_fp32"]["all_greedy_identical"] and report["onnx_fp32"]["token_agreement"] == 1.0
    assert report["onnx_fp32"]["logits_max_abs_diff"] <= FP32_TOLERANCE
    assert (tiny_exports["chat"] / "generation_config.json").is_file()


def test_merged_export_loads_with_transformers(tiny_exports, tiny_export_adapters, tiny_bert_dir):
    folder = tiny_exports["two-merged"]
    manifest = read_export_folder(folder)
    assert manifest.format == "merged" and manifest.model_file == "" and "model.safetensors" in manifest.files
    assert _parity(folder)["merged_torch"]["max_abs_diff"] <= 1e-5
    merged = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    reference = PeftModel.from_pretrained(reference, tiny_export_adapters["two"]).eval()
    batch = AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=1e-4)


def test_tampered_export_is_refused(tiny_exports, tmp_path):
    import shutil

    folder = Path(shutil.copytree(tiny_exports["two"], tmp_path / "copy"))
    with open(folder / ONNX_MODEL_FILE, "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(AdapterFormatError, match="does not match its hash"):
        read_export_folder(folder)


def test_failed_export_leaves_nothing(tiny_export_adapters, tiny_bert_dir, tmp_path, monkeypatch):
    import training.export.runner as runner

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(runner, "export_onnx", broken)
    out = tmp_path / "exports" / "two"
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_folder(tiny_export_adapters["two"], out, base=str(tiny_bert_dir))
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_failed_reexport_keeps_the_previous_export(tiny_exports, tiny_export_adapters, tiny_bert_dir, tmp_path,
                                                   monkeypatch):
    import shutil

    import training.export.runner as runner

    out = Path(shutil.copytree(tiny_exports["two"], tmp_path / "two"))
    before = read_export_folder(out)
    monkeypatch.setattr(runner, "quantize_int8", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    with pytest.raises(RuntimeError):
        export_folder(tiny_export_adapters["two"], out, base=str(tiny_bert_dir), quantize="int8")
    assert read_export_folder(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]


def test_refusals(tiny_export_adapters, tmp_path):
    adapter = tiny_export_adapters["two"]
    with pytest.raises(ConfigError, match="inside the adapter folder"):
        ExportOptions(adapter_dir=adapter, out=adapter / "export")
    with pytest.raises(ConfigError, match="must not be"):
        ExportOptions(adapter_dir=adapter, out=adapter)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an export folder"):
        ExportOptions(adapter_dir=adapter, out=tmp_path / "busy")
    with pytest.raises(ConfigError, match="--format onnx only"):
        ExportOptions(adapter_dir=adapter, out=tmp_path / "x", format="merged", quantize="int8")
    with pytest.raises(ConfigError, match="--base-only applies to --format int8 or int4"):
        ExportOptions(adapter_dir=adapter, out=tmp_path / "x", format="onnx", base_only=True)
    with pytest.raises(ConfigError, match="parity-rows"):
        ExportOptions(adapter_dir=adapter, out=tmp_path / "x", parity_rows=0)


def test_cli_export_and_errors(tiny_export_adapters, tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "cli-export"
    args = ["export", str(tiny_export_adapters["two"]), "--format", "onnx", "--out", str(out),
            "--base", str(tiny_bert_dir), "--parity-rows", "4"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and printed["labels"] == list(TINY_LABELS) and printed["parity"]["rows"] == 4
    assert read_export_folder(out).format == "onnx"
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == USAGE_ERROR
    assert "is not a directory" in capsys.readouterr().err
    assert main(["export", str(out), "--out", str(tmp_path / "o")]) == USAGE_ERROR  # an export is no adapter
    assert "adapter_config.json is missing" in capsys.readouterr().err
    assert main(["export", str(tiny_export_adapters["three"]), "--out", str(tmp_path / "o")]) == USAGE_ERROR
    assert "pass --base" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
