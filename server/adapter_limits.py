"""What the admin API may be asked to load: paths inside the adapter roots, folders and ranks under a bound.

Checked before anything is read (path, size) or right after the folder is parsed (rank), so a hostile or
mistaken add costs no device memory and names the limit it broke. Errors are AdapterError subclasses:
the routes answer them 400 with the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from adapters import AdapterError
from server.config import ServerConfig

# ServerConfig holds the defaults (2 GiB: a rank-64 LoRA on every linear of an 8B model is ~0.7 GB in fp32;
# rank 64: every device slot is padded to the largest resident rank, lora_slots.py)
DEFAULT_MAX_ADAPTER_BYTES: int = ServerConfig.model_fields["max_adapter_bytes"].default
DEFAULT_MAX_LORA_RANK: int = ServerConfig.model_fields["max_lora_rank"].default


class AdapterPathError(AdapterError):
    """The adapter path is outside every configured adapter root (symlinks resolved)."""


class AdapterLimitError(AdapterError):
    """The adapter is larger than a configured limit (bytes, rank)."""


def default_adapter_roots(startup_paths: Iterable[str | Path], state_dir: Path) -> tuple[Path, ...]:
    """The roots when none are configured: the PARENT folder of each start-up --adapter path, and the
    state dir. Parents, not the paths themselves: the paths alone would only let a runtime add re-read the
    adapters already served, while the folder they sit in is where the operator keeps adapters (a training
    run's --out next to the others). With no --adapter and no --adapter-root only the state dir is allowed:
    a server started bare reads nothing of the file system it was not pointed at."""
    parents = [Path(p).expanduser().absolute().parent for p in startup_paths]
    return tuple(dict.fromkeys([*parents, Path(state_dir).expanduser().absolute()]))


@dataclass(frozen=True)
class AdapterLimits:
    """`roots`: folders runtime adapter paths must resolve inside (None: anywhere, for embedded use and
    tests); `max_bytes`: total size of the adapter folder's files; `max_rank`: largest LoRA rank."""

    roots: tuple[Path, ...] | None = None
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    max_rank: int = DEFAULT_MAX_LORA_RANK

    def __post_init__(self) -> None:
        if self.roots is not None:  # resolved once: a root given through a symlink still matches
            object.__setattr__(self, "roots", tuple(Path(r).expanduser().resolve() for r in self.roots))

    def check_path(self, path: Path) -> Path:
        """`path` resolved (symlinks followed), if it and every file directly in it lie inside a root."""
        resolved = Path(path).expanduser().resolve()
        if self.roots is None:
            return resolved
        if not self._inside(resolved):
            raise AdapterPathError(
                f"adapter path {str(path)!r} is outside the adapter roots "
                f"({', '.join(map(str, self.roots))}); start the server with --adapter-root DIR to allow its folder")
        if resolved.is_dir():
            for item in resolved.iterdir():
                if item.is_symlink() and not self._inside(item.resolve()):
                    raise AdapterPathError(
                        f"adapter path {str(path)!r} holds {item.name!r}, a symlink that leads outside the adapter roots")
        return resolved

    def check_size(self, folder: Path) -> None:
        """Refuse a folder whose files (top level, the ones an adapter is read and copied from) exceed max_bytes."""
        if not folder.is_dir():
            return  # reading it says "not a directory"
        total = sum(item.stat().st_size for item in folder.iterdir() if item.is_file())
        if total > self.max_bytes:
            raise AdapterLimitError(
                f"adapter folder {folder.name!r} holds {total} bytes, more than the limit of {self.max_bytes} "
                "(max_adapter_bytes, --max-adapter-bytes)")

    def check_rank(self, name: str, rank: int) -> None:
        if rank > self.max_rank:
            raise AdapterLimitError(
                f"adapter {name!r} has LoRA rank {rank}, more than the limit of {self.max_rank} "
                "(max_lora_rank, --max-lora-rank)")

    def _inside(self, resolved: Path) -> bool:
        return any(resolved == root or resolved.is_relative_to(root) for root in self.roots)
