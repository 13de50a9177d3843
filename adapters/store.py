"""The on-disk adapter store and the atomic, durable write helpers every writer uses.

A folder is written under a temporary name in the same parent, every file and folder in it is fsync'ed,
it is renamed into place and the parent folder is fsync'ed, so a reader (or a process started after a
crash or a power cut) sees either the old folder or the complete new one, never a half-written one; a
failed write leaves nothing behind. The temporary names start with '.', so `AdapterStore.names` never
lists them and `AdapterStore.sweep` removes what a killed writer left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from adapters.names import validate_adapter_name

TMP_MARK = ".tmp-"  # in the name of every temporary file or folder these helpers create
OLD_MARK = ".old-"  # a folder moved aside while its replacement is renamed into place


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (POSIX: the directory itself must be fsync'ed)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, deepest first, `root` itself last."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            file = Path(folder) / name
            if file.is_symlink():
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def atomic_write_text(path: str | Path, text: str, mode: int = 0o644) -> None:
    """Write `path` so that it holds either its old text or all of `text`, whatever happens (kill -9 too)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `dest` (durably), on error it is removed."""
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_MARK}", dir=dest.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        _replace_dir(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dest: Path) -> None:
    """Rename `src` onto `dest`; an existing `dest` is moved aside first and removed after."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}{OLD_MARK}{os.getpid()}-{id(src)}")
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
    """Named adapter folders under one root: `root/<name>/` (names validated, writes atomic and durable)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / validate_adapter_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def install(self, name: str, source: str | Path) -> Path:
        """Copy the files of folder `source` (top level, symlinks followed) into the store as `name`,
        replacing any previous version atomically."""
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
        fsync_dir(self.root)
        return True

    def sweep(self) -> list[str]:
        """Remove what a killed writer left (hidden temporary and moved-aside folders); returns their names.
        Only for a store no other process is writing to at the moment."""
        if not self.root.is_dir():
            return []
        left = [p for p in self.root.iterdir() if p.name.startswith(".") and (TMP_MARK in p.name or OLD_MARK in p.name)]
        for path in left:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return sorted(p.name for p in left)
