"""Two secrets, kept apart: the admin token (configured, or generated at start and written mode 0600 where
the CLI finds it) guards the admin routes; the optional API keys guard the inference routes. Neither grants
the other's routes: a key handed to an application cannot load adapters, and the operator's token is not
a client credential. /health, /ready and /metrics need neither.

Both are compared as bytes in constant time (`bearer_matches`): `secrets.compare_digest` on two str raises
TypeError as soon as one holds a non-ASCII character, which a client controls."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Iterable

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


def secret_bytes(value: str) -> bytes:
    """A configured secret as the bytes a client sends for it (UTF-8)."""
    return value.encode("utf-8")


def header_bytes(value: str) -> bytes:
    """A header value back to the bytes on the wire: starlette decodes header bytes as latin-1, which
    encodes back losslessly; a str from elsewhere that latin-1 cannot hold is taken as UTF-8."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def bearer_matches(authorization: str | None, expected: Iterable[bytes]) -> bool:
    """True when `Authorization: Bearer <secret>` names one of `expected`. Every candidate is compared
    (constant time, no early exit), so the timing says nothing about which key or how much matched."""
    scheme, _, presented = (authorization or "").strip().partition(" ")
    token = header_bytes(presented.strip())
    if scheme.lower() != "bearer" or not token:
        return False
    results = [hmac.compare_digest(token, candidate) for candidate in expected]
    return any(results)


def load_api_keys(api_key: str | None, api_key_file: Path | None) -> tuple[bytes, ...]:
    """The inference API keys: `api_key`, plus one key per line of `api_key_file` (blank lines and lines
    starting with # skipped; several lines let keys rotate). Empty: the inference routes are open.
    Raises ValueError (a start-up error) for a file that cannot be read or holds no key."""
    keys = [api_key.strip()] if api_key and api_key.strip() else []
    if api_key_file is not None:
        try:
            lines = Path(api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the API key file {api_key_file}: {exc}") from exc
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise ValueError(f"the API key file {api_key_file} holds no key")
        keys += from_file
    return tuple(secret_bytes(key) for key in keys)
