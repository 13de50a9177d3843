"""Property-based fuzzing of the running app's own OpenAPI schema (schemathesis 4, in process over ASGI).

Every operation (generation, classification, /v1/models, /health, /ready, and the admin routes with the
admin token) gets schema-valid (positive) and schema-invalid (negative) requests: no answer may be a 5xx,
and every answer must be one the schema documents, with the documented content type and body. The run
is bounded (`MAX_EXAMPLES` per operation and mode) and derandomized, so CI sees the same cases every
time. What it found is pinned by plain regression tests: the "hostile inputs" in test_api_generate.py
and test_openai_fields.py.

The limits keep each generated request cheap on the tiny models: a fuzzed completion decodes at most
`MAX_TOKENS` tokens. (schemathesis' own pytest plugin, `from_fixture(...).parametrize()`, fails on
pytest 9: it reads `request.node._nodeid`; its public `as_strategy` with Hypothesis is used instead.)
"""

from __future__ import annotations

from pathlib import Path

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance,
)
from schemathesis.python.asgi import shutdown_lifespans

from server.api.app import create_app
from server.config import ServerConfig
from tests.server.conftest import ADMIN

MAX_EXAMPLES = 30  # per operation and generation mode
MAX_TOKENS = 4
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
LLAMA_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/models", "/health", "/ready",
               "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/admin/adapters", "/admin/adapters/{name}"}
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck), print_blob=False,
)


def _name_a_served_model(case, served: tuple[str, ...]) -> None:
    """A random `model` is almost always unknown (404), so generation would never run: most positive
    cases name a served model instead, picked by the generated name so the run stays deterministic."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = (*served, case.body["model"])[len(case.body["model"]) % (len(served) + 1)]


def _fuzz(app, paths: set[str], served: tuple[str, ...]) -> dict[str, str]:
    """Run every operation under `paths` through schemathesis; return {operation: first failure} (empty: clean).

    The admin token is a fixed header on every call: without it the admin routes would only ever answer
    401 (tested in test_api_admin.py). The ASGI transport starts the app's lifespan on first call; it is
    shut down here, so the scheduler thread does not outlive the test."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: dict[str, str] = {}
    seen: set[str] = set()
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path not in paths:
                continue
            seen.add(operation.path)
            for mode in MODES:
                @FUZZ_SETTINGS
                @given(case=operation.as_strategy(mode, headers=dict(ADMIN)))
                def run(case) -> None:
                    if mode is GenerationMode.POSITIVE:
                        _name_a_served_model(case, served)
                    case.call_and_validate(checks=CHECKS)

                try:
                    run()
                except Unsatisfiable:  # nothing in this operation can be made invalid (no parameters, no body)
                    continue
                except (Exception, BaseExceptionGroup) as exc:  # collected, reported below with its case
                    failures[f"{operation.label} ({mode.value})"] = str(exc)[:3000]
    finally:
        shutdown_lifespans()
    assert seen == paths, f"operations missing from the schema: {paths - seen}"
    return failures


def test_fuzz_the_llama_app(tmp_path: Path, tiny_llama_base, tiny_adapters):
    config = ServerConfig(
        base=str(tiny_llama_base.prepared.path), served_name="tiny", adapters={"alpha": str(tiny_adapters["alpha"])},
        state_dir=tmp_path / "state", admin_token="test-token", max_model_len=64, max_tokens_limit=MAX_TOKENS,
        default_max_tokens=MAX_TOKENS, max_waiting=8,
    )
    failures = _fuzz(create_app(config, base=tiny_llama_base), LLAMA_PATHS, ("tiny", "alpha"))
    assert not failures, "\n\n".join(f"== {op}\n{text}" for op, text in failures.items())


def test_fuzz_classify_on_the_bert_app(tmp_path: Path, tiny_bert_base, tiny_classifiers):
    config = ServerConfig(
        base=str(tiny_bert_base.prepared.path), served_name="tiny-bert", state_dir=tmp_path / "state",
        adapters={name: str(path) for name, path in tiny_classifiers.items()}, admin_token="test-token",
    )
    failures = _fuzz(create_app(config, base=tiny_bert_base), {"/v1/classify"}, ("tiny-bert", "two", "three"))
    assert not failures, "\n\n".join(f"== {op}\n{text}" for op, text in failures.items())


def test_the_schema_documents_the_error_body(tiny_llama_base, tmp_path):
    config = ServerConfig(base=str(tiny_llama_base.prepared.path), served_name="tiny", state_dir=tmp_path,
                          admin_token="t")
    with TestClient(create_app(config, base=tiny_llama_base)) as client:
        spec = client.get("/openapi.json").json()
    completions = spec["paths"]["/v1/completions"]["post"]
    assert {"400", "404", "429", "500"} <= set(completions["responses"])
    body = spec["components"]["schemas"]["CompletionRequest"]
    assert body["additionalProperties"] is False and "presence_penalty" in body["properties"]
