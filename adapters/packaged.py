"""Files shipped inside installed Python packages (the embedded models and data sets)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def packaged_path(package: str, relpath: str) -> Path:
    """Path of `relpath` inside the installed `package`; FileNotFoundError saying which part is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.exists():
        raise FileNotFoundError(f"the package {package!r} has no {relpath}")
    return path
