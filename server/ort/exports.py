"""Export folders as the onnxruntime backend serves them: validated when added, a session on first use.

`ExportReader` is the registry's reader for this backend: the registry's memory tier (an LRU bounded by
--max-cpu-loras, where entries held by a request or pinned are never evicted) is therefore the bounded LRU
of ONNX sessions; an evicted export is re-read (manifest and file hashes checked again) when next named.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adapters import AdapterError, AdapterFormatError, AdapterMismatchError, ExportManifest, read_export_folder
from adapters.export_manifest import EXPORT_MANIFEST_FILE
from adapters.manifest import sha256_file
from server.ort.base import OrtBase

SessionFactory = Callable[[Path], Any]  # model file -> onnxruntime.InferenceSession


class SessionTracker:
    """Opens sessions with the server's options, and counts them for the metrics."""

    def __init__(self, threads: int) -> None:
        import onnxruntime as ort  # only when this backend is chosen

        self._ort = ort
        self.threads = threads
        self.loads = 0
        self._open: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def open(self, model_file: Path):
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = self.threads  # 0: onnxruntime's default (one per physical core)
        options.inter_op_num_threads = 1
        session = self._ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        with self._lock:
            self.loads += 1
            self._open.add(session)
        return session

    def open_count(self) -> int:
        """Sessions alive: resident exports' and those still held by a request after an eviction."""
        with self._lock:
            return len(self._open)


@dataclass(frozen=True, eq=False)
class LoadedExport:
    """One export ready to serve. Shaped like the torch engine's LoadedAdapter where the routes look
    (name, version, task, rank, pinned, source); the session opens on first use and goes with the object."""

    name: str
    version: int
    task: str
    source: Path
    rank: int
    manifest: ExportManifest
    eos_ids: frozenset[int]
    open_session: SessionFactory = field(repr=False)
    pinned: bool = False
    _session: list = field(default_factory=list, repr=False)  # [] until first use, then [session]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @property
    def model_file(self) -> Path:
        return self.source / self.manifest.model_file

    def session(self):
        """The export's onnxruntime session, opened on the first call (thread-safe)."""
        with self._lock:
            if not self._session:
                self._session.append(self.open_session(self.model_file))
            return self._session[0]

    @property
    def has_session(self) -> bool:
        return bool(self._session)


class ExportReader:
    """The registry's reader for the onnxruntime backend (see server.registry.AdapterReader)."""

    def __init__(self, base: OrtBase, sessions: SessionTracker) -> None:
        self.base = base
        self.sessions = sessions

    def read(self, name: str, source: Path, version: int, pinned: bool) -> LoadedExport:
        manifest = read_export_folder(source)
        check_servable(manifest, source, self.base)
        return LoadedExport(
            name=name, version=version, task=manifest.task, source=source, rank=manifest.adapter_rank,
            manifest=manifest, eos_ids=frozenset(export_eos_ids(source) or self.base.eos_ids),
            open_session=self.sessions.open, pinned=pinned,
        )

    def digest(self, source: Path) -> str:
        """The manifest's hash: it lists every file's hash, and a re-read checks them all again."""
        path = Path(source) / EXPORT_MANIFEST_FILE
        if not path.is_file():
            read_export_folder(source)  # raises the message that says what the folder is instead
        return sha256_file(path)


def check_servable(manifest: ExportManifest, source: Path, base: OrtBase) -> None:
    """AdapterError unless this backend can serve the export on this base."""
    if manifest.format != "onnx":
        raise AdapterFormatError(
            f"{source.name!r} is a {manifest.format} export; the onnxruntime backend serves --format onnx exports "
            "(a merged folder serves with the torch backend as --base)"
        )
    if manifest.base_fingerprint != base.fingerprint:
        raise AdapterMismatchError(
            f"export {source.name!r} was made from base {manifest.base_name!r} (fingerprint "
            f"{manifest.base_fingerprint}), but this server serves exports of {base.name!r} "
            f"(fingerprint {base.fingerprint})"
        )
    if manifest.task == "completion" and not base.can_generate:
        raise AdapterError(f"completion export {source.name!r} needs a causal LM base; this base is an encoder")
    if manifest.task == "classification" and not manifest.labels:
        raise AdapterFormatError(f"classification export {source.name!r} names no labels in {EXPORT_MANIFEST_FILE}")


def export_eos_ids(folder: Path) -> set[int]:
    """End-of-sequence ids from the export's generation_config.json (empty if it names none)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        ids = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise AdapterFormatError(f"generation_config.json of {Path(folder).name!r} is unreadable: {exc}") from exc
    ids = ids if isinstance(ids, list) else [ids]
    return {int(i) for i in ids if isinstance(i, int)}
