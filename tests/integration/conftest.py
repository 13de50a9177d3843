"""Integration fixtures: the real SmolLM2 base loaded once per run, and the shipped example adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.engine.backend import Backend
from server.engine.base_model import BaseModel, load_base

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "adapters"
CPU_FP32 = Backend(torch.device("cpu"), torch.float32)
RANDOM_B_STD = 0.2


def example_adapters(task: str) -> dict[str, Path]:
    """The shipped example adapters of one task, by folder name."""
    found = {}
    for manifest in sorted(EXAMPLES.glob("*/manifest.json")):
        if json.loads(manifest.read_text())["task"] == task:
            found[manifest.parent.name] = manifest.parent
    return found


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def smollm2(smollm2_base) -> BaseModel:
    return load_base(smollm2_base, CPU_FP32)


@pytest.fixture(scope="session")
def minilm(minilm_base) -> BaseModel:
    return load_base(minilm_base, CPU_FP32)


@pytest.fixture(scope="session")
def random_completion_adapter(tmp_path_factory, smollm2_base) -> Path:
    """A rank-8 adapter with random weights big enough to change SmolLM2's greedy output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_base.path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, RANDOM_B_STD)
    out = tmp_path_factory.mktemp("random-adapter")
    peft_model.save_pretrained(out)
    return out
