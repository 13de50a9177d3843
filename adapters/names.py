"""Adapter names: the `model` field of a request, and a folder name in the store."""

import re

from adapters.errors import AdapterNameError

# Long enough for "customer-1234-support-v12"-style ids, short enough for a metric label and a folder name.
MAX_NAME_LENGTH = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # used with fullmatch: "$" would let "name\n" through


def validate_adapter_name(name: str) -> str:
    """Return `name` if it is safe as a model id and a folder name, else raise AdapterNameError.

    Allowed: 1..MAX_NAME_LENGTH of ASCII letters, digits, '.', '_', '-', starting with a letter or digit
    (so never '.', '-' or a hidden folder); no path separators, no '..'. Whether a name is free (not the
    base's own name, not taken) is the registry's question, not this one.
    """
    if not isinstance(name, str) or not name:
        raise AdapterNameError("adapter name must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise AdapterNameError(f"adapter name is longer than {MAX_NAME_LENGTH} characters")
    if ".." in name or "/" in name or "\\" in name:
        raise AdapterNameError(f"adapter name {name!r} must not contain path separators or '..'")
    if not _NAME_RE.fullmatch(name):
        raise AdapterNameError(
            f"adapter name {name!r} may only use letters, digits, '.', '_' and '-', "
            "and must start with a letter or digit"
        )
    return name
