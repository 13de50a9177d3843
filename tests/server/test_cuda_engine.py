"""The engine on CUDA against the same engine on CPU (the reference): every served method in one mixed
batch, and classification through the app. `gpu` marker: skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from adapters import read_adapter_folder
from server.api.app import create_app
from server.config import ServerConfig
from server.engine.backend import Backend
from server.engine.base_model import load_base
from server.engine.batch_runner import BatchRunner, RowInput
from server.engine.loaded import load_adapter
from tests.server.conftest import CPU_FP32, _prepared
from tests.server.test_freeze import make_freeze
from tests.server.test_ia3 import make_ia3
from tests.server.test_prompt_learning import prompt_folders  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA_FP32 = Backend(torch.device("cuda"), torch.float32)


@pytest.fixture(scope="module")
def method_folders(tmp_path_factory, tiny_llama_dir, tiny_adapters, prompt_folders):  # noqa: F811
    root = tmp_path_factory.mktemp("methods")
    return {**tiny_adapters, "ia3": make_ia3(tiny_llama_dir, root / "ia3", 21),
            "freeze": make_freeze(tiny_llama_dir, root / "freeze", 31, ["model.layers.1.mlp.down_proj"]),
            "prompt": prompt_folders["prompt"], "prefix": prompt_folders["prefix"]}


def _run(base, backend, folders: dict[str, Path]) -> list[torch.Tensor]:
    adapters = [load_adapter(n, 1, read_adapter_folder(p), backend.device, backend.dtype, lora_home=base.lora_home)
                for n, p in folders.items()] + [None]
    if backend.device.type == "cuda":  # the memory tier: LoRA weights in pinned host memory, slots on the GPU
        lora = [w for a in adapters if a is not None for w in a.lora.values()]
        assert lora and all(w.a.device.type == "cpu" and w.a.is_pinned() for w in lora)
    runner = BatchRunner(base, len(adapters), 64)
    prompt = base.tokenizer("Once upon a time there was")["input_ids"]
    rows, logits = [], []
    for slot, adapter in enumerate(adapters):
        virtual = adapter.num_virtual_tokens if adapter is not None else 0
        tokens = ([0] * virtual if adapter is not None and adapter.virtual_tokens is not None else []) + prompt
        start = virtual if adapter is not None and adapter.prefix else 0
        rows.append(RowInput(slot, start, tokens, adapter, prompt=adapter if virtual else None))
    logits.append(runner.forward(rows).cpu())
    lengths = [r.start + len(r.tokens) for r in rows]
    for step in range(3):
        decode = [RowInput(r.slot, lengths[i] + step, [11 + step], r.adapter) for i, r in enumerate(rows)]
        logits.append(runner.forward(decode).cpu())
    return logits


def test_every_method_on_cuda_equals_cpu(tiny_llama_dir, method_folders):
    cpu = _run(load_base(_prepared(tiny_llama_dir), CPU_FP32), CPU_FP32, method_folders)
    cuda = _run(load_base(_prepared(tiny_llama_dir), CUDA_FP32), CUDA_FP32, method_folders)
    for want, got in zip(cpu, cuda):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_bf16_cuda_greedy_tokens_follow_fp32(tiny_llama_dir, tiny_adapters):
    """bfloat16 on the GPU (the default there) decodes and its logits stay near fp32's."""
    fp32 = _run(load_base(_prepared(tiny_llama_dir), CUDA_FP32), CUDA_FP32, tiny_adapters)
    bf16_backend = Backend(torch.device("cuda"), torch.bfloat16)
    bf16 = _run(load_base(_prepared(tiny_llama_dir), bf16_backend), bf16_backend, tiny_adapters)
    for want, got in zip(fp32, bf16):
        assert torch.isfinite(got).all()
        assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


def test_classification_on_cuda_equals_peft(tmp_path, tiny_bert_dir, tiny_classifiers):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["a wonderful, moving film", "dull and far too long"]
    base = load_base(_prepared(tiny_bert_dir), CUDA_FP32)
    config = ServerConfig(base=str(tiny_bert_dir), served_name="tiny-bert", device="cuda", dtype="float32",
                          adapters={n: str(p) for n, p in tiny_classifiers.items()}, state_dir=tmp_path / "state")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    with TestClient(create_app(config, base=base)) as client:
        for name, folder in tiny_classifiers.items():
            response = client.post("/v1/classify", json={"model": name, "input": texts})
            assert response.status_code == 200, response.text
            rows = response.json()["data"]
            labels = len(rows[0]["probs"])
            model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=labels)
            model = PeftModel.from_pretrained(model, folder).eval()
            with torch.no_grad():
                ref = torch.softmax(model(**tokenizer(texts, padding=True, return_tensors="pt")).logits, -1)
            for row, expected in zip(rows, ref):
                got = torch.tensor([row["probs"][f"LABEL_{i}"] for i in range(labels)])
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)
