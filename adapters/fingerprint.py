"""A base model's fingerprint: stable across loads, cheap to compute, different for different weights.

Computed from the prepared base FOLDER (not a loaded module), so training, which loads the base with a
task head, and the server, which loads it bare, agree. It hashes each safetensors file's header (names,
dtypes, shapes, offsets) and a sample of its bytes at both ends, plus the architecture in config.json.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

SAMPLE_BYTES = 1 << 20
FINGERPRINT_LENGTH = 16


def fingerprint_base_folder(folder: Path) -> str:
    folder = Path(folder)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        keep = {k: cfg.get(k) for k in ("architectures", "model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
        digest.update(json.dumps(keep, sort_keys=True).encode())
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors weights in base folder {folder}")
    for path in weights:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            digest.update(fh.read(header_len))
            digest.update(fh.read(SAMPLE_BYTES))
            fh.seek(max(size - SAMPLE_BYTES, 0))
            digest.update(fh.read(SAMPLE_BYTES))
        digest.update(str(size).encode())
    return digest.hexdigest()[:FINGERPRINT_LENGTH]
