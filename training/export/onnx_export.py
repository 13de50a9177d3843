"""A merged HF folder -> one ONNX graph with optimum's exporter (optimum-onnx).

Completion exports use optimum's `text-generation-with-past` task: one graph that takes input_ids,
attention_mask, position_ids and past_key_values.{i}.key/value and returns logits and present.{i}.key/value,
so a runtime keeps the KV cache between steps (a prefill is the same graph with an empty past).
Classification exports use `text-classification`: input_ids, attention_mask (token_type_ids for BERT)
-> logits [batch, num_labels], the head included.
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from adapters.export_manifest import ONNX_MODEL_FILE
from training.errors import TrainingError

log = logging.getLogger(__name__)

OPTIMUM_TASKS = {"completion": "text-generation-with-past", "classification": "text-classification"}
EXPORT_EXTRA_HINT = "install the export extra: pip install -e '.[export]'"
VERSIONED_PACKAGES = ("optimum", "optimum-onnx", "onnx", "onnxruntime", "torch", "transformers")


class ExportToolsMissingError(TrainingError):
    """optimum / onnxruntime are not installed (they come with the `export` extra)."""


def export_onnx(merged_dir: Path, out_dir: Path, task: str, opset: int | None) -> dict[str, Any]:
    """Write model.onnx (+ config.json, generation config and tokenizer files) into `out_dir`.

    Returns the export settings for the manifest: optimum task, opset, library versions.
    """
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise ExportToolsMissingError(f"ONNX export needs optimum-onnx ({exc}); {EXPORT_EXTRA_HINT}") from exc
    optimum_task = OPTIMUM_TASKS[task]
    log.info("exporting %s to ONNX (%s)", merged_dir, optimum_task)
    try:
        main_export(
            str(merged_dir), str(out_dir), task=optimum_task, opset=opset, device="cpu", library_name="transformers",
            local_files_only=True, do_validation=False,  # parity is checked by our own report, against the adapter
        )
    except (ValueError, KeyError, NotImplementedError) as exc:  # optimum's words for an unsupported model or opset
        raise TrainingError(f"optimum cannot export this model as {optimum_task}: {exc}") from exc
    if not (out_dir / ONNX_MODEL_FILE).is_file():
        raise TrainingError(f"optimum wrote no {ONNX_MODEL_FILE} (files: {sorted(p.name for p in out_dir.iterdir())})")
    return {"optimum_task": optimum_task, "opset": _graph_opset(out_dir / ONNX_MODEL_FILE),
            "versions": package_versions()}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _graph_opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
