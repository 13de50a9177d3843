"""Adapter-test fixtures: one stock PEFT folder on the tiny Llama, shared read-only by the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adapters.peft_folders import save_peft_adapter


@pytest.fixture(scope="session")
def peft_folder(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """q_proj + v_proj, r=4, alpha=8 on the tiny Llama. Read-only: tests that damage it use `copy_folder`."""
    return save_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("peft") / "adapter")
