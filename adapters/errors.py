"""Errors a user can cause with an adapter folder; the server maps them to 4xx responses."""


class AdapterError(ValueError):
    """Base class: the adapter (or its name) is unusable, and the message says why."""


class AdapterFormatError(AdapterError):
    """The folder is not a readable adapter: missing files, pickle weights, bad config, bad tensors."""


class AdapterMismatchError(AdapterError):
    """The adapter is well-formed but does not fit this base (targets, shapes, fingerprint)."""


class AdapterNameError(AdapterError):
    """The adapter name is not a safe, simple identifier."""
