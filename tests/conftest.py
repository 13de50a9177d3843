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
