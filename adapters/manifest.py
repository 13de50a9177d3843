"""Our optional `manifest.json` beside PEFT's files: which base, which task, labels, metrics, hashes.

A stock PEFT folder has no manifest and still loads; when a manifest is present its file hashes
are checked, so a half-copied or edited folder is caught before it is served.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters.errors import AdapterFormatError
from adapters.json_file import read_json_object

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
TASKS = ("completion", "classification")
# Methods whose folders the server serves: LoRA folders it stacks on its base (a qlora folder is one: its
# LoRA was trained over a 4-bit copy of the same base, and serving it on the full-precision base is QLoRA's
# usual use), and prompt-learning folders it applies per request (virtual tokens, per-layer prefixes).
SERVED_METHODS = ("lora", "qlora", "ia3", "prompt", "prefix", "ptuning", "freeze")
COMPLETION_ONLY_METHODS = ("prompt", "prefix", "ptuning")
# How `training merge` combined its parents (PEFT's add_weighted_adapter combination types); the merged
# folder itself is a LoRA folder (method "lora"), served like a trained one.
MERGE_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
MIN_MERGE_PARENTS = 2
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Manifest:
    """What PEFT's config does not say about an adapter."""

    task: str
    base_name: str
    base_fingerprint: str
    method: str = "lora"
    labels: tuple[str, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    created_at: str = ""
    format_version: int = MANIFEST_VERSION
    # A `training merge` folder: its parent adapters (folder names), the weight of each, and how they were
    # combined (one of MERGE_METHODS); all three empty for a trained folder.
    parents: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    merge_method: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise AdapterFormatError(f"manifest task must be one of {TASKS}, got {self.task!r}")
        if self.format_version > MANIFEST_VERSION:
            raise AdapterFormatError(
                f"manifest format_version {self.format_version} is newer than this build understands"
            )
        for name in ("parents", "weights"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise AdapterFormatError(f"manifest {name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))  # JSON gives lists
        _check_merge_fields(self)

    def to_json(self) -> str:
        data = asdict(self)
        for name in ("labels", "parents", "weights"):
            data[name] = list(data[name])
        return json.dumps(data, indent=2, sort_keys=True)


def _check_merge_fields(manifest: Manifest) -> None:
    """A merged folder names at least two distinct parents, one finite weight each, and a known method;
    a trained folder names none of them."""
    parents, weights, method = manifest.parents, manifest.weights, manifest.merge_method
    if not method:
        if parents or weights:
            raise AdapterFormatError("manifest names merge parents or weights but no merge_method")
        return
    if method not in MERGE_METHODS:
        raise AdapterFormatError(f"manifest merge_method must be one of {MERGE_METHODS}, got {method!r}")
    if manifest.method != "lora":
        raise AdapterFormatError(f"a merged folder is a LoRA folder (method 'lora'), not {manifest.method!r}")
    if len(parents) < MIN_MERGE_PARENTS:
        raise AdapterFormatError(f"a merged folder names at least {MIN_MERGE_PARENTS} parents, got {len(parents)}")
    if not all(isinstance(p, str) and p for p in parents) or len(set(parents)) != len(parents):
        raise AdapterFormatError(f"manifest parents must be distinct non-empty names, got {list(parents)}")
    if len(weights) != len(parents):
        raise AdapterFormatError(f"manifest names {len(parents)} parents but {len(weights)} weights")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise AdapterFormatError(f"manifest weights must be finite numbers, got {weight!r}")


def check_served_method(manifest: Manifest) -> None:
    """Raise AdapterFormatError if the manifest names a method whose folders are not LoRA folders (prompt
    tuning, IA3, freeze, full, ...): refused by name before their files are read as LoRA."""
    if manifest.method == "full":
        raise AdapterFormatError(
            "method 'full' folders are complete models, not adapters: serve one as the base "
            "(server serve --base DIR); its classification head is then served under the base's model id")
    if manifest.method not in SERVED_METHODS:
        raise AdapterFormatError(
            f"method {manifest.method!r} adapters are not served yet; served methods: {', '.join(SERVED_METHODS)}"
        )
    if manifest.method in COMPLETION_ONLY_METHODS and manifest.task != "completion":
        raise AdapterFormatError(
            f"method {manifest.method!r} adapters are served for completion only; this one is for {manifest.task}"
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, or None for a stock PEFT folder. Raises AdapterFormatError if unreadable."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        return None
    raw = read_json_object(path)
    known = set(Manifest.__dataclass_fields__)
    try:
        fields = {k: v for k, v in raw.items() if k in known}
        fields["labels"] = tuple(fields.get("labels") or ())
        return Manifest(**fields)
    except TypeError as exc:
        raise AdapterFormatError(f"{MANIFEST_FILE} is missing fields: {exc}") from exc


def check_file_hashes(folder: Path, manifest: Manifest) -> None:
    """Raise AdapterFormatError if a file listed in the manifest is missing or changed."""
    check_hashes(folder, manifest.files, MANIFEST_FILE)


def check_hashes(folder: Path, files: dict[str, str], listed_in: str) -> None:
    """Raise AdapterFormatError if a file of `files` (name -> sha256, from `listed_in`) is missing or changed."""
    for name, expected in files.items():
        path = Path(folder) / name
        if not path.is_file():
            raise AdapterFormatError(f"file {name!r} listed in {listed_in} is missing")
        if sha256_file(path) != expected:
            raise AdapterFormatError(f"file {name!r} does not match its hash in {listed_in}")


def hash_files(folder: Path, skip: str) -> dict[str, str]:
    """sha256 of every plain file in `folder` but `skip` (the manifest that will list them)."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != skip}


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Hash every file in `folder` (but the manifest) into the manifest and write it. Returns what was written."""
    folder = Path(folder)
    files = hash_files(folder, MANIFEST_FILE)
    created = manifest.created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    final = Manifest(**{**asdict(manifest), "files": files, "created_at": created, "labels": manifest.labels})
    (folder / MANIFEST_FILE).write_text(final.to_json())
    return final
