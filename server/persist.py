"""Runtime adapters that survive a restart: a copy of each acknowledged adapter, and a journal of them.

Layout, one folder per (port, base fingerprint), so two servers on one host, on different ports or
different bases, never load (or garbage-collect) each other's adapters:

    <state_dir>/runtime-adapters/port-<port>-base-<fingerprint>/
        journal.json          {"format": 1, "base_fingerprint": ..., "adapters": [{name, digest, pinned, version, source}]}
        store/<digest>/       the adapter's files, as they were when it was added (content-addressed)

Why a copy, not the path: the admin API acknowledges an adapter once it has read and validated it; if
the server only recorded the path, deleting, editing or unmounting the source folder afterwards would
lose it at the next restart (or at the next re-read after an LRU eviction) although it was acknowledged.
The copy is what the server serves and re-reads from; its folder name is the adapter's digest, so a
copy is written once whatever names share it, and a replace writes a new folder beside the old one
instead of over a folder a running request may still re-read.

Crash safety (kill -9 at any point of an add, replace or remove): the copy is written by
`atomic_directory` (temporary folder, fsync of every file and folder, rename, fsync of the parent) and
the journal by `atomic_write_text` (the same for one file). The journal's rename is the commit point:
the admin route answers only after it, so every acknowledged adapter is in the journal. What a killed
add leaves (a temporary folder, a copy no journal entry names) is removed by `recover` at the next start;
an add killed after the commit but before its answer reached the client is restored complete.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from adapters import AdapterError, AdapterStore, validate_adapter_name
from adapters.store import atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.json"
JOURNAL_FORMAT = 1
RUNTIME_DIR = "runtime-adapters"


@dataclass(frozen=True)
class PersistedAdapter:
    name: str
    digest: str  # of the adapter's files (the reader's digest), and the name of its copy in the store
    pinned: bool
    version: int
    source: str  # where it was added from; informational, the copy is what is served


def runtime_state_dir(state_dir: Path, port: int, fingerprint: str) -> Path:
    return Path(state_dir).expanduser() / RUNTIME_DIR / f"port-{port}-base-{fingerprint}"


class RuntimeAdapters:
    """The journal and the store of one server. Thread-safe; one process per folder (the port is exclusive)."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.store = AdapterStore(self.folder / "store")
        self.journal_path = self.folder / JOURNAL_FILE
        self._lock = threading.Lock()
        self._pending: collections.Counter[str] = collections.Counter()  # digests staged, not yet committed
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._keep_all_copies = False  # set when the journal was unreadable: its copies may still be wanted
        self._records: dict[str, PersistedAdapter] = self._read_journal()

    def records(self) -> list[PersistedAdapter]:
        with self._lock:
            return list(self._records.values())

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._records

    def path_of(self, digest: str) -> Path:
        return self.store.path(digest)

    def recover(self) -> list[PersistedAdapter]:
        """At start-up: remove what a killed writer left, and the copies no journal entry names; return
        the journal's entries, oldest first."""
        with self._lock:
            for name in self.store.sweep():
                log.info("removed %s, left in %s by an add that did not finish", name, self.store.root)
            for stray in self.folder.glob(f".{JOURNAL_FILE}.tmp-*"):
                stray.unlink(missing_ok=True)
            self._collect()
            return list(self._records.values())

    # -- an add: stage (copy) -> commit (journal) or unstage ----------------------------------

    def stage(self, source: Path, digest: str, digest_of: Callable[[Path], str]) -> Path:
        """Copy `source` into the store as `digest` (unless a verified copy is there) and return the copy.
        AdapterError if the copy's digest differs: the folder changed while it was being added."""
        with self._lock:
            self._pending[digest] += 1
        try:
            dest = self.store.path(digest)
            if not dest.is_dir() or digest_of(dest) != digest:
                self.store.install(digest, source)
            if digest_of(dest) != digest:
                raise AdapterError(f"adapter folder {str(source)!r} changed while it was being added; add it again")
            return dest
        except BaseException:
            self.unstage(digest)
            raise

    def unstage(self, digest: str) -> None:
        """The add failed after `stage`: its copy goes unless something else names it."""
        with self._lock:
            self._done(digest)
            self._collect()

    def commit(self, record: PersistedAdapter) -> None:
        """Record `record` (replacing an entry of the same name) durably; from here the add is acknowledged.
        On an OSError (disk full...) nothing changed and the caller refuses the add."""
        with self._lock:
            records = {**self._records, record.name: record}
            self._write(records)
            self._records = records
            self._done(record.digest)
            self._collect()

    def forget(self, name: str) -> bool:
        """Remove `name` from the journal (durably) and its copy if nothing else names it."""
        with self._lock:
            if name not in self._records:
                return False
            records = {n: r for n, r in self._records.items() if n != name}
            self._write(records)
            self._records = records
            self._collect()
            return True

    # -- internals (caller holds the lock) ------------------------------------------------------

    def _done(self, digest: str) -> None:
        self._pending[digest] -= 1
        if self._pending[digest] <= 0:
            del self._pending[digest]

    def _collect(self) -> None:
        """Remove the copies neither the journal nor an add in flight names."""
        if self._keep_all_copies:
            return
        keep = {r.digest for r in self._records.values()} | set(self._pending)
        removed = False
        for digest in self.store.names():
            if digest not in keep:
                shutil.rmtree(self.store.root / digest, ignore_errors=True)
                removed = True
        if removed:
            fsync_dir(self.store.root)

    def _write(self, records: dict[str, PersistedAdapter]) -> None:
        body = {"format": JOURNAL_FORMAT, "base_fingerprint": self.fingerprint,
                "adapters": [asdict(r) for r in records.values()]}
        atomic_write_text(self.journal_path, json.dumps(body, indent=1) + "\n", mode=0o600)

    def _read_journal(self) -> dict[str, PersistedAdapter]:
        """The journal's entries; an unreadable journal is moved aside (kept for a person to look at) and
        the server starts with none, never fails to start; a bad entry is logged and left out."""
        if not self.journal_path.exists():
            return {}
        try:
            raw = json.loads(self.journal_path.read_text())
            if not isinstance(raw, dict) or raw.get("format") != JOURNAL_FORMAT:
                raise ValueError(f"not a format-{JOURNAL_FORMAT} journal")
            if raw.get("base_fingerprint") != self.fingerprint:
                raise ValueError(f"written for base fingerprint {raw.get('base_fingerprint')!r}")
            entries = raw.get("adapters")
            if not isinstance(entries, list):
                raise ValueError("'adapters' is not a list")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            aside = self.journal_path.with_name(f"{JOURNAL_FILE}.unreadable-{int(time.time())}")
            self.journal_path.replace(aside)
            self._keep_all_copies = True
            log.error("runtime adapter journal %s is unreadable (%s): moved to %s; no runtime adapter restored, "
                      "and no stored copy removed",
                      self.journal_path, exc, aside)
            return {}
        records: dict[str, PersistedAdapter] = {}
        for item in entries:
            try:
                record = _record(item)
            except (AdapterError, KeyError, TypeError, ValueError) as exc:
                log.warning("runtime adapter journal %s: entry %.200r skipped: %s", self.journal_path, item, exc)
                continue
            records[record.name] = record
        return records


def _record(item: object) -> PersistedAdapter:
    if not isinstance(item, dict):
        raise ValueError("not an object")
    record = PersistedAdapter(name=item["name"], digest=item["digest"], pinned=item["pinned"],
                              version=item["version"], source=item.get("source", ""))
    validate_adapter_name(record.name)
    validate_adapter_name(record.digest)  # a folder name in the store: no separators, no '..'
    if not isinstance(record.pinned, bool) or not isinstance(record.version, int) or not isinstance(record.source, str):
        raise ValueError("pinned, version or source has the wrong type")
    return record
