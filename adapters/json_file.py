"""Read the JSON object a folder's config or manifest file must hold, or say plainly why not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapters.errors import AdapterFormatError


def read_json_object(path: Path) -> dict[str, Any]:
    """The decoded object in `path`; AdapterFormatError naming the file if it is unreadable or not an object."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{Path(path).name} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{Path(path).name} must hold a JSON object")
    return raw
