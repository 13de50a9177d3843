"""The adapter contract shared by `training/` and `server/`: folder format, validation, store, merge math.

It imports neither `server` nor `training`.
"""

from adapters.bases import EMBEDDED_BASES, BaseNotFoundError, PreparedBase, resolve_base
from adapters.errors import AdapterError, AdapterFormatError, AdapterMismatchError, AdapterNameError
from adapters.export_manifest import (
    EXPORT_MANIFEST_FILE, ExportManifest, is_export_folder, read_export_folder, write_export_manifest,
)
from adapters.folder import CONFIG_FILE, WEIGHTS_FILE, AdapterFolder, LoraWeights, folder_digest, read_adapter_folder
from adapters.manifest import MANIFEST_FILE, Manifest, read_manifest, write_manifest
from adapters.names import validate_adapter_name
from adapters.spec import LoraSpec, parse_lora_config
from adapters.store import AdapterStore, atomic_directory
from adapters.validate import BaseSignature, align_to_base, validate_against_base

__all__ = [
    "EMBEDDED_BASES", "BaseNotFoundError", "PreparedBase", "resolve_base",
    "AdapterError", "AdapterFormatError", "AdapterMismatchError", "AdapterNameError",
    "CONFIG_FILE", "WEIGHTS_FILE", "AdapterFolder", "LoraWeights", "folder_digest", "read_adapter_folder",
    "EXPORT_MANIFEST_FILE", "ExportManifest", "is_export_folder", "read_export_folder", "write_export_manifest",
    "MANIFEST_FILE", "Manifest", "read_manifest", "write_manifest",
    "validate_adapter_name", "LoraSpec", "parse_lora_config",
    "AdapterStore", "atomic_directory", "BaseSignature", "align_to_base", "validate_against_base",
]
