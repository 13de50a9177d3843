"""The on-disk adapter store and the atomic-directory helper every writer uses.

A folder is written under a temporary name in the same parent and renamed into place, so a reader
never sees a half-written adapter or export, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from adapters.names import validate_adapter_name


@contextlib.contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `dest`, on error it is removed."""
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dest: Path) -> None:
    """Rename `src` onto `dest`; an existing `dest` is moved aside first and removed after."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{id(src)}")
        os.replace(dest, old)
    try:
        os.replace(src, dest)
    except OSError:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class AdapterStore:
    """Named adapter folders under one root: `root/<name>/` (names validated, writes atomic)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / validate_adapter_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def install(self, name: str, source: str | Path) -> Path:
        """Copy the folder `source` into the store as `name`, replacing any previous version atomically."""
        dest = self.path(name)
        with atomic_directory(dest) as tmp:
            for item in Path(source).iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
        return dest

    def remove(self, name: str) -> bool:
        dest = self.path(name)
        if not dest.exists():
            return False
        shutil.rmtree(dest)
        return True
