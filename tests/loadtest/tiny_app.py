"""The server config the dashboard and scrape tests serve: the tiny Llama with one LoRA adapter."""

from __future__ import annotations

from pathlib import Path

from server.config import ServerConfig

SERVED_NAME = "tiny"
ADAPTER = "alpha"
MAX_TOKENS = 4


def tiny_config(base_dir: Path, adapter_dir: Path, state_dir: Path, port: int = 8000) -> ServerConfig:
    return ServerConfig(base=str(base_dir), served_name=SERVED_NAME, adapters={ADAPTER: str(adapter_dir)},
                        state_dir=state_dir, admin_token="test-token", port=port, device="cpu",
                        max_model_len=256, max_tokens_limit=64)


def completion(model: str) -> dict:
    """A short completion request body for the base (SERVED_NAME) or the adapter (ADAPTER)."""
    return {"model": model, "prompt": "Hello there", "max_tokens": MAX_TOKENS}
