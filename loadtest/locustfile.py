"""Locust users for a running server: completions spread over the served models (base + adapters).

Run it as its own process (locust cannot be imported beside torch: gevent monkey-patching), e.g.
`./loadtest/run.sh --users 8 --run-time 60s`. Models are read from GET /v1/models at start, so the
load follows whatever adapters the server holds; LORAPLEX_MAX_TOKENS sets the completion length.
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, events, task

PROMPTS = [
    "What is the capital of France?",
    "How do I reset my password?",
    "Tell me a joke about computers.",
    "Who wrote Hamlet?",
]
MAX_TOKENS = int(os.environ.get("LORAPLEX_MAX_TOKENS", "32"))
MODELS: list[str] = []


@events.test_start.add_listener
def _discover_models(environment, **_):
    import requests

    response = requests.get(f"{environment.host}/v1/models", timeout=30)
    response.raise_for_status()
    MODELS[:] = [m["id"] for m in response.json()["data"] if m.get("task", "completion") == "completion"]


class CompletionUser(HttpUser):
    wait_time = between(0.0, 0.5)

    @task(3)
    def completion(self) -> None:
        model = random.choice(MODELS or ["smollm2-135m"])
        body = {"model": model, "prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS, "temperature": 0.7}
        self.client.post("/v1/completions", json=body, name=f"/v1/completions [{model}]")

    @task(1)
    def chat(self) -> None:
        model = random.choice(MODELS or ["smollm2-135m"])
        body = {"model": model, "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
                "max_tokens": MAX_TOKENS, "temperature": 0.7}
        self.client.post("/v1/chat/completions", json=body, name=f"/v1/chat/completions [{model}]")
