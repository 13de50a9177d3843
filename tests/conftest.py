"""Shared fixtures: the real offline bases (prepared once per run into the cache) and tiny models.

Unit tests use the tiny models (random weights, real tokenizers); integration tests use the real
bases. LORAPLEX_CACHE (set by .ci/run) points every run at one cache folder, so the GGUF conversion
happens once per machine, not once per test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adapters import PreparedBase, resolve_base

TINY_HIDDEN = 64


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex"))


@pytest.fixture(scope="session")
def smollm2_base(cache_dir: Path) -> PreparedBase:
    return resolve_base("smollm2-135m", cache_dir)


@pytest.fixture(scope="session")
def minilm_base(cache_dir: Path) -> PreparedBase:
    return resolve_base("minilm-l6", cache_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_base: PreparedBase) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template, saved as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_base.path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_base: PreparedBase) -> Path:
    """A 2-layer random BERT with MiniLM's real tokenizer, saved as an HF folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_base.path)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = BertModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


# -- exports (training export), shared by tests/training and tests/server ------------------------------

EXAMPLE_ADAPTERS = Path(__file__).resolve().parents[1] / "examples" / "adapters"
TINY_LABELS = ("neg", "pos")


def export_folder(adapter_dir: Path, out: Path, **options) -> Path:
    """Run `training export` in-process (ExportOptions fields as keyword arguments); returns `out`."""
    from training.export.options import ExportOptions
    from training.export.runner import export_adapter

    export_adapter(ExportOptions(adapter_dir=adapter_dir, out=out, **options))
    return out


@pytest.fixture(scope="session")
def tiny_export_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path,
                         tiny_llama_dir: Path) -> dict[str, Path]:
    """PEFT adapters on the tiny bases: classifiers `two` (manifest with labels) and `three` (stock PEFT,
    no manifest), and a completion adapter `chat`."""
    from adapters import Manifest, write_manifest
    from adapters.fingerprint import fingerprint_base_folder
    from tests.server.conftest import make_causal_adapter, make_classifier_adapter

    root = tmp_path_factory.mktemp("export-adapters")
    two = make_classifier_adapter(tiny_bert_dir, root / "two", 3, 2)
    write_manifest(two, Manifest(task="classification", base_name=tiny_bert_dir.name,
                                 base_fingerprint=fingerprint_base_folder(tiny_bert_dir), labels=TINY_LABELS))
    return {
        "two": two,
        "three": make_classifier_adapter(tiny_bert_dir, root / "three", 4, 3),
        "chat": make_causal_adapter(tiny_llama_dir, root / "chat", 5, 4, ["q_proj", "v_proj", "down_proj"]),
    }


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory: pytest.TempPathFactory, tiny_export_adapters: dict[str, Path],
                 tiny_bert_dir: Path, tiny_llama_dir: Path) -> dict[str, Path]:
    """ONNX exports of the tiny adapters: `two`, `two-int8`, `three` (tiny BERT), `chat` (tiny Llama), and a
    merged folder `two-merged`. Exported once per test session."""
    root = tmp_path_factory.mktemp("exports")
    bert, llama = str(tiny_bert_dir), str(tiny_llama_dir)
    adapters = tiny_export_adapters
    return {
        "two": export_folder(adapters["two"], root / "two", base=bert),
        "two-int8": export_folder(adapters["two"], root / "two-int8", base=bert, quantize="int8"),
        "three": export_folder(adapters["three"], root / "three", base=bert),
        "two-merged": export_folder(adapters["two"], root / "two-merged", base=bert, format="merged"),
        "chat": export_folder(adapters["chat"], root / "chat", base=llama, parity_tokens=8),
    }


@pytest.fixture(scope="session")
def sentiment_int8_export(tmp_path_factory: pytest.TempPathFactory, minilm_base: PreparedBase) -> Path:
    """The shipped minilm-l6 sentiment adapter exported with INT8, parity over all its held-out rows."""
    return export_folder(EXAMPLE_ADAPTERS / "sentiment", tmp_path_factory.mktemp("real") / "sentiment-int8",
                         quantize="int8", parity_rows=4096)


@pytest.fixture(scope="session")
def sentiment_onnx_export(tmp_path_factory: pytest.TempPathFactory, minilm_base: PreparedBase) -> Path:
    """The shipped sentiment adapter exported in fp32 (a short parity report: the tests check rows themselves)."""
    return export_folder(EXAMPLE_ADAPTERS / "sentiment", tmp_path_factory.mktemp("real") / "sentiment",
                         parity_rows=32)


@pytest.fixture(scope="session")
def tech_onnx_export(tmp_path_factory: pytest.TempPathFactory, smollm2_base: PreparedBase) -> Path:
    """The shipped chatbot-tech adapter on smollm2-135m exported in fp32 (about 40 s on 2 cores)."""
    return export_folder(EXAMPLE_ADAPTERS / "chatbot-tech", tmp_path_factory.mktemp("real") / "chatbot-tech")
