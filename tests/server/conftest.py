"""Server fixtures: tiny PEFT adapters (random, non-zero B) on the tiny bases, and apps built on them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from adapters import PreparedBase, read_adapter_folder, validate_against_base
from adapters.fingerprint import fingerprint_base_folder
from server.api.app import create_app
from server.config import ServerConfig
from server.engine.backend import Backend
from server.engine.base_model import BaseModel, load_base
from server.engine.loaded import LoadedAdapter, load_adapter

CPU_FP32 = Backend(torch.device("cpu"), torch.float32)


def make_peft_folder(base_dir: Path, out: Path, config, seed: int, key: str, init) -> Path:
    """Save a PEFT adapter on a tiny causal base, its parameters whose names hold `key` redrawn in place by
    `init` (PEFT's own init is tiny or the identity: the adapter would hardly change the logits)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if key in name:
                init(param)
    peft_model.save_pretrained(out)
    return out


def make_causal_adapter(base_dir: Path, out: Path, seed: int, r: int, targets: list[str], **extra) -> Path:
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **extra)
    return make_peft_folder(base_dir, out, config, seed, "lora_B", lambda p: p.normal_(0, 0.5))


def make_classifier_adapter(base_dir: Path, out: Path, seed: int, num_labels: int, r: int = 4) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=8, target_modules=["query", "value"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    """Two completion adapters of different ranks and target sets (one rsLoRA) on the tiny Llama."""
    root = tmp_path_factory.mktemp("tiny-adapters")
    return {
        "alpha": make_causal_adapter(tiny_llama_dir, root / "alpha", 1, 4, ["q_proj", "v_proj"]),
        "beta": make_causal_adapter(tiny_llama_dir, root / "beta", 2, 8, ["q_proj", "k_proj", "o_proj", "down_proj"],
                                    use_rslora=True),
    }


@pytest.fixture(scope="session")
def tiny_classifiers(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-classifiers")
    return {
        "two": make_classifier_adapter(tiny_bert_dir, root / "two", 3, 2),
        "three": make_classifier_adapter(tiny_bert_dir, root / "three", 4, 3),
    }


def load_folder(folder: Path, base: BaseModel, name: str) -> LoadedAdapter:
    """Read, check against `base` and load an adapter folder, as the registry does (fp32, CPU)."""
    parsed = read_adapter_folder(folder)
    validate_against_base(parsed, base.signature)
    return load_adapter(name, 1, parsed, CPU_FP32.device, CPU_FP32.dtype)


def _prepared(folder: Path) -> PreparedBase:
    return PreparedBase(folder.name, folder, fingerprint_base_folder(folder))


@pytest.fixture(scope="session")
def tiny_llama_base(tiny_llama_dir: Path) -> BaseModel:
    return load_base(_prepared(tiny_llama_dir), CPU_FP32)


@pytest.fixture(scope="session")
def tiny_llama_base_loop(tiny_llama_dir: Path) -> BaseModel:
    """The same base with the loop reference LoRA kernel (the default is the stacked kernel)."""
    return load_base(_prepared(tiny_llama_dir), CPU_FP32, lora_kernel="loop")


@pytest.fixture(scope="session")
def tiny_bert_base(tiny_bert_dir: Path) -> BaseModel:
    return load_base(_prepared(tiny_bert_dir), CPU_FP32)


@pytest.fixture
def llama_client(tmp_path: Path, tiny_llama_base: BaseModel, tiny_adapters: dict[str, Path]):
    config = ServerConfig(
        base=str(tiny_llama_base.prepared.path), served_name="tiny", adapters={"alpha": str(tiny_adapters["alpha"])},
        state_dir=tmp_path / "state", admin_token="test-token", max_model_len=256, max_tokens_limit=64,
        adapter_roots=[tmp_path.parent],  # pytest's base temp: the session's adapter folders may be hot-added
    )
    with TestClient(create_app(config, base=tiny_llama_base)) as client:
        yield client


@pytest.fixture
def bert_client(tmp_path: Path, tiny_bert_base: BaseModel, tiny_classifiers: dict[str, Path]):
    config = ServerConfig(
        base=str(tiny_bert_base.prepared.path), served_name="tiny-bert",
        adapters={name: str(path) for name, path in tiny_classifiers.items()},
        state_dir=tmp_path / "state", admin_token="test-token",
    )
    with TestClient(create_app(config, base=tiny_bert_base)) as client:
        yield client


ADMIN = {"Authorization": "Bearer test-token"}


WAIT_S = 60  # seconds a test waits for a request to finish


class Collector:
    """Gathers one request's outputs from the scheduler thread."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.cancel_after = cancel_after
        self.request = None
        self.deltas = []
        self.error = None
        self.done = threading.Event()

    def __call__(self, item) -> None:
        if isinstance(item, BaseException):
            self.error = item
            self.done.set()
            return
        self.deltas.append(item)
        if self.cancel_after is not None and len(self.deltas) == self.cancel_after:
            self.request.cancel()  # as a disconnecting client does, from another thread
            self.done.set()
        if item.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self):
        assert self.done.wait(WAIT_S), "request did not finish"
        assert self.error is None
        return [d.token_id for d in self.deltas]
