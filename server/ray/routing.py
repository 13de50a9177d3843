"""What the ingress reads from a request to route it: its `model`, and the adapters that names.

The multiplexed model id is the request's `model` as the client wrote it (an adapter, or a combination of
adapters, which a replica then holds as one multiplexed model); the base's own name is no adapter, so those
requests carry no id and Ray sends them anywhere.
"""

from __future__ import annotations

import json

from server.api.combination import is_combination, parse_combination
from server.api.errors import ApiError

# The routes whose JSON body names a model (OpenAI's and ours); everything else goes to any replica.
MODEL_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/embeddings"})


def model_of(method: str, path: str, body: bytes) -> str | None:
    """The body's `model` on a model route, if it is a string; None otherwise (the app answers what is wrong)."""
    if method != "POST" or path not in MODEL_ROUTES:
        return None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = value.get("model") if isinstance(value, dict) else None
    return model if isinstance(model, str) and model else None


def adapter_names(model: str | None, served_name: str) -> tuple[str, ...]:
    """The adapters `model` names: none for the base or a malformed combination (the app answers it), the
    parents of a combination, else the adapter itself."""
    if model is None or model == served_name:
        return ()
    if not is_combination(model):
        return (model,)
    try:
        return parse_combination(model).names
    except ApiError:
        return ()
