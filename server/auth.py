"""The admin token: configured, or generated at start and written (mode 0600) where the CLI finds it."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
SHOWN_PREFIX = 4


def token_path(state_dir: Path, port: int) -> Path:
    """One token file per port, so two servers on one host do not overwrite each other's tokens."""
    return Path(state_dir) / f"admin-token-{port}"


def establish_admin_token(configured: str | None, state_dir: Path, port: int) -> str:
    """Return the admin token, writing it to `token_path` with mode 0600. Only a prefix is ever logged."""
    token = configured or secrets.token_urlsafe(TOKEN_BYTES)
    path = token_path(state_dir, port)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.replace(tmp, path)
    log.info("admin token %s... written to %s (mode 0600)", token[:SHOWN_PREFIX], path)
    return token


def read_admin_token(state_dir: Path, port: int) -> str | None:
    path = token_path(state_dir, port)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
