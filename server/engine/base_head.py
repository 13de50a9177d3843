"""A base that is itself a trained classifier (`training full` on a classification task, or a merged export
of a classification adapter) classifies under the base's own model id, with the head saved in its folder.

The folder's manifest (or export manifest) says so: task classification, its labels; the head's tensors
are read from the folder's safetensors files by name (`classifier.*` for BERT-style, `score.*` for decoder-style models),
whichever model class the server loaded the backbone with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from adapters import is_export_folder, read_export_folder, read_manifest
from adapters.dense import HEAD_MODULES
from server.engine.base_model import BaseModel
from server.engine.loaded import LoadedAdapter, find_head


def base_classifier(base: BaseModel, served_name: str) -> LoadedAdapter | None:
    """The base's own classifier, or None when its folder is not a trained classifier."""
    folder = Path(base.prepared.path)
    manifest = read_export_folder(folder, check_files=False) if is_export_folder(folder) else read_manifest(folder)
    if manifest is None or manifest.task != "classification":
        return None
    head = find_head(_head_tensors(folder), manifest.labels, base.backend.device, base.backend.dtype)
    if head is None:
        return None
    return LoadedAdapter(name=served_name, version=0, task="classification", source=folder, rank=0, lora={},
                         head=head, metadata={"metrics": getattr(manifest, "metrics", {})}, pinned=True)


def _head_tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as reader:
            for key in reader.keys():
                if key.split(".", 1)[0] in HEAD_MODULES:
                    found[key] = reader.get_tensor(key)
    return found
