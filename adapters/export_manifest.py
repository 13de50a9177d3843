"""Export folders: a base with one adapter merged in, written by `training export`, read by the server.

An export folder is a self-contained model, not an adapter: `config.json`, the tokenizer, and either
merged safetensors weights (format "merged"), one ONNX graph (format "onnx"), or a quantized base
checkpoint (formats "int8" / "int4": `quantized.safetensors` + `quantization.json`, adapters.quantized), plus
`export_manifest.json` (which base, which adapter, which export settings, the labels, the parity
figures and every file's hash) and `parity.json` (the full parity report). The manifest is written
last, so a folder without one is not an export.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters.errors import AdapterFormatError
from adapters.json_file import read_json_object
from adapters.manifest import TASKS, check_hashes, hash_files
from adapters.quantized import QUANT_METHODS, QUANT_WEIGHTS_FILE

EXPORT_MANIFEST_FILE = "export_manifest.json"
EXPORT_MANIFEST_VERSION = 1
PARITY_FILE = "parity.json"
ONNX_MODEL_FILE = "model.onnx"
QUANTIZED_FORMATS = QUANT_METHODS  # "int8", "int4": a quantized base checkpoint, adapter merged or base alone
EXPORT_FORMATS = ("merged", "onnx", *QUANTIZED_FORMATS)
QUANTIZATIONS = ("none", *QUANT_METHODS)


@dataclass(frozen=True)
class ExportManifest:
    """What a runtime needs to know about an export before it loads anything."""

    format: str  # one of EXPORT_FORMATS
    task: str  # completion | classification
    base_name: str
    base_fingerprint: str
    adapter_name: str  # the adapter folder's name when it was exported
    adapter_digest: str  # sha256 over the adapter's config, weights and manifest (adapters.folder_digest)
    adapter_rank: int = 0  # the adapter's largest LoRA rank (informational)
    # one of QUANTIZATIONS; onnx "int8": the graph's matmuls hold int8 weights; an int8 / int4 export's own method
    quantize: str = "none"
    labels: tuple[str, ...] = ()  # classification: index -> label, as in config.json's id2label
    model_file: str = ""  # the ONNX graph or quantized weights a runtime loads ("" for a merged folder)
    settings: dict[str, Any] = field(default_factory=dict)  # exporter task, opset, library versions, quantizer
    parity: dict[str, Any] = field(default_factory=dict)  # headline figures; parity.json has the full report
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    created_at: str = ""
    format_version: int = EXPORT_MANIFEST_VERSION

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise AdapterFormatError(f"export format must be one of {EXPORT_FORMATS}, got {self.format!r}")
        if self.task not in TASKS:
            raise AdapterFormatError(f"export task must be one of {TASKS}, got {self.task!r}")
        if self.quantize not in QUANTIZATIONS:
            raise AdapterFormatError(f"export quantize must be one of {QUANTIZATIONS}, got {self.quantize!r}")
        if self.format == "onnx" and not self.model_file:
            raise AdapterFormatError(f"an onnx export must name its model_file in {EXPORT_MANIFEST_FILE}")
        if self.format in QUANTIZED_FORMATS and (self.quantize != self.format or self.model_file != QUANT_WEIGHTS_FILE):
            raise AdapterFormatError(f"an {self.format} export must say quantize {self.format!r} and model_file "
                                     f"{QUANT_WEIGHTS_FILE!r} in {EXPORT_MANIFEST_FILE}")
        if self.quantize not in ("none", self.format) and self.format != "onnx":
            raise AdapterFormatError(f"quantize {self.quantize!r} does not apply to a {self.format} export")
        if self.format == "onnx" and self.quantize not in ("none", "int8"):
            raise AdapterFormatError(f"an onnx export's quantize is 'none' or 'int8', got {self.quantize!r}")
        if self.format_version > EXPORT_MANIFEST_VERSION:
            raise AdapterFormatError(
                f"{EXPORT_MANIFEST_FILE} format_version {self.format_version} is newer than this build understands"
            )

    def to_json(self) -> str:
        data = asdict(self)
        data["labels"] = list(self.labels)
        return json.dumps(data, indent=2, sort_keys=True)


def is_export_folder(path: str | Path) -> bool:
    return (Path(path) / EXPORT_MANIFEST_FILE).is_file()


def write_export_manifest(folder: Path, manifest: ExportManifest) -> ExportManifest:
    """Hash every file in `folder` into the manifest and write it (last). Returns what was written."""
    folder = Path(folder)
    created = manifest.created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    final = ExportManifest(**{**asdict(manifest), "labels": tuple(manifest.labels),
                              "files": hash_files(folder, EXPORT_MANIFEST_FILE), "created_at": created})
    (folder / EXPORT_MANIFEST_FILE).write_text(final.to_json())
    return final


def read_export_folder(path: str | Path, check_files: bool = True) -> ExportManifest:
    """The manifest of the export at `path`, its files checked against their hashes.

    Raises AdapterFormatError saying what is wrong: not a folder, an adapter folder rather than an
    export, an unreadable manifest, a missing or changed file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFormatError(f"export path {str(folder)!r} is not a directory")
    manifest_path = folder / EXPORT_MANIFEST_FILE
    if not manifest_path.is_file():
        hint = " (it is an adapter folder)" if (folder / "adapter_config.json").is_file() else ""
        raise AdapterFormatError(
            f"{folder.name!r} is not an export folder{hint}: {EXPORT_MANIFEST_FILE} is missing; "
            f"make one with `training export {folder} --format onnx --out DIR`"
        )
    raw = read_json_object(manifest_path)
    known = set(ExportManifest.__dataclass_fields__)
    try:
        values = {k: v for k, v in raw.items() if k in known}
        values["labels"] = tuple(values.get("labels") or ())
        manifest = ExportManifest(**values)
    except TypeError as exc:
        raise AdapterFormatError(f"{EXPORT_MANIFEST_FILE} is missing fields: {exc}") from exc
    if not isinstance(manifest.files, dict) or not all(isinstance(v, str) for v in manifest.files.values()):
        raise AdapterFormatError(f"{EXPORT_MANIFEST_FILE}: files must map file names to sha256 hashes")
    if manifest.model_file and manifest.model_file not in manifest.files:
        raise AdapterFormatError(f"{EXPORT_MANIFEST_FILE}: model_file {manifest.model_file!r} is not among its files")
    if check_files:
        check_hashes(folder, manifest.files, EXPORT_MANIFEST_FILE)
    return manifest
