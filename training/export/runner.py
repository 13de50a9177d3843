"""`training export`: adapter folder -> export folder, written atomically (nothing half-written is left).

int8 / int4 (a quantized base checkpoint) go to training.export.quantized_export. Otherwise, order: torch reference figures from the unmerged adapter, then merge, then (onnx) export + parity of the
fp32 graph, then (int8) quantize + parity of the INT8 graph, then parity.json, then the manifest last.
Everything happens inside `adapters.atomic_directory`, so a failure at any step leaves `out` as it was.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import ExportManifest, atomic_directory, write_export_manifest
from adapters.export_manifest import ONNX_MODEL_FILE, PARITY_FILE
from training.export import parity
from training.export.merged import merge, save_merged
from training.export.onnx_export import export_onnx, package_versions
from training.export.options import QUANTIZED_FORMATS, ExportOptions
from training.export.quantized_export import export_quantized
from training.export.quantize import quantize_int8
from training.export.source import ExportSource, load_source
from training.trained_folder import PEFT_METHODS

log = logging.getLogger(__name__)

STAGE_DIR = ".stage"  # inside the atomic temp folder; removed before it is renamed into place
REFERENCE = "torch fp32: the base with the adapter applied unmerged (PEFT)"
PLAIN_REFERENCE = "torch fp32: the {method} folder's model (its trained weights are the model's own; nothing to merge)"


@dataclass(frozen=True)
class ExportResult:
    out: Path
    manifest: ExportManifest
    parity: dict[str, Any]


def export_adapter(options: ExportOptions) -> ExportResult:
    """Write the export `options` asks for; raises TrainingError / AdapterError for what a user can fix."""
    source = load_source(options)
    if options.format in QUANTIZED_FORMATS:
        manifest, report = export_quantized(source, options)
        return ExportResult(Path(options.out), manifest, report)
    reference = _run_torch(source, source.model, options)
    method = source.folder.method
    reference_text = REFERENCE if method in PEFT_METHODS else PLAIN_REFERENCE.format(method=method)
    report: dict[str, Any] = {"task": source.task, "method": method, "reference": reference_text,
                              **parity.rows_summary(source.rows)}
    if source.task == "classification":
        report["max_length"] = source.max_length
        report["torch"] = parity.accuracy(reference, source.rows.gold)
    else:
        report["new_tokens"] = options.parity_tokens
    merged = merge(source.model)
    with atomic_directory(options.out) as tmp:
        stage = tmp / STAGE_DIR
        if options.format == "merged":
            save_merged(merged, source.tokenizer, source.labels, tmp)
            report["merged_torch"] = _compare(source, reference, _run_torch(source, merged, options))
            settings: dict[str, Any] = {"versions": package_versions()}
            model_file = ""
        else:
            save_merged(merged, source.tokenizer, source.labels, stage)
            del merged
            gc.collect()
            settings = export_onnx(stage, tmp, source.task, options.opset)
            model_file = ONNX_MODEL_FILE
            report["onnx_fp32"] = _compare(source, reference, _run_onnx(source, tmp, options))
            if options.quantize == "int8":
                settings["quantization"] = quantize_int8(tmp / model_file, stage / model_file)
                os.replace(stage / model_file, tmp / model_file)
                report["onnx_int8"] = _compare(source, reference, _run_onnx(source, tmp, options))
        shutil.rmtree(stage, ignore_errors=True)
        settings["adapter_method"] = method
        (tmp / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
        manifest = write_export_manifest(tmp, ExportManifest(
            format=options.format, task=source.task, base_name=source.base.name,
            base_fingerprint=source.base.fingerprint, adapter_name=source.folder.path.resolve().name,
            adapter_digest=source.digest(), adapter_rank=source.rank, quantize=options.quantize,
            labels=source.labels, model_file=model_file, settings=settings, parity=parity.headline(report),
        ))
    log.info("export written to %s", options.out)
    return ExportResult(Path(options.out), manifest, report)


def _run_torch(source: ExportSource, model, options: ExportOptions):
    rows = source.rows
    if source.task == "classification":
        return parity.class_logits(parity.torch_scorer(model), source.tokenizer, rows.texts, source.max_length)
    return parity.greedy(model, rows.prompts, options.parity_tokens, source.tokenizer.pad_token_id)


def _run_onnx(source: ExportSource, folder: Path, options: ExportOptions):
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = options.threads
    rows = source.rows
    if source.task == "classification":
        session = ort.InferenceSession(str(folder / ONNX_MODEL_FILE), session_options,
                                       providers=["CPUExecutionProvider"])
        return parity.class_logits(parity.session_scorer(session), source.tokenizer, rows.texts, source.max_length)
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(folder, file_name=ONNX_MODEL_FILE, use_cache=True,
                                                local_files_only=True, provider="CPUExecutionProvider",
                                                session_options=session_options)
    return parity.greedy(model, rows.prompts, options.parity_tokens, source.tokenizer.pad_token_id)


def _compare(source: ExportSource, reference, got) -> dict[str, Any]:
    if source.task == "classification":
        return parity.compare_classification(reference, got, source.rows.gold)
    return parity.compare_completion(reference, got)
