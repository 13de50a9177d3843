"""Continued pre-training on raw text: packing into blocks, a tiny run whose held-out perplexity falls, and
`training eval` rebuilding the same figures from the folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from adapters import read_adapter_folder
from training.data import Dataset, TextExample
from training.errors import DatasetError
from training.evaluate import evaluate_adapter
from training.output import TrainResult
from training.pretrain import document_ids, pack_blocks
from training.runner import run_training
from tests.training.conftest import tiny_config

DOCUMENTS = [
    "The river runs past the old mill and under the stone bridge.",
    "Bees visit the clover in the meadow every summer morning.",
    "The baker lights the oven before dawn and bakes bread for the village.",
    "Snow covers the hills in winter and melts into the river in spring.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _dataset(*texts: str) -> Dataset:
    return Dataset("docs", "pretrain", tuple(TextExample(t) for t in texts))


def test_blocks_are_the_document_stream_cut_to_length(tokenizer) -> None:
    blocks = pack_blocks(tokenizer, _dataset(*DOCUMENTS), 16)
    stream = sum((document_ids(tokenizer, d) for d in DOCUMENTS), [])
    assert [t for b in blocks for t in b.input_ids] == stream
    assert all(len(b.input_ids) == 16 for b in blocks[:-1]) and 2 <= len(blocks[-1].input_ids) <= 16
    assert all(b.labels == b.input_ids for b in blocks), "the loss is on every token"
    assert stream.count(tokenizer.eos_token_id) == len(DOCUMENTS), "each document ends with EOS"


def test_too_little_text_is_a_clear_error(tokenizer) -> None:
    with pytest.raises(DatasetError, match="too little text"):
        pack_blocks(tokenizer, Dataset("tiny", "pretrain", ()), 16)


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> TrainResult:
    """Two text files in one run (--data a,b), so the per-data-set figures of the causal-LM path are covered too."""
    root = tmp_path_factory.mktemp("pretrain")
    rivers, village = root / "rivers.txt", root / "village.txt"
    rivers.write_text("\n\n".join([DOCUMENTS[0], DOCUMENTS[3]] * 6) + "\n")
    village.write_text("\n\n".join([DOCUMENTS[1], DOCUMENTS[2]] * 6) + "\n")
    config = tiny_config(tiny_llama_dir, f"{rivers},{village}", root / "adapter", task="pretrain", max_length=24,
                         max_steps=20, eval_every=10)
    return run_training(config, progress=False)


def test_pretrain_lowers_held_out_perplexity(pretrain_run: TrainResult) -> None:
    held_out = pretrain_run.manifest.metrics["held_out"]
    assert held_out["adapter"]["perplexity"] < held_out["base"]["perplexity"]
    assert held_out["rows"] > 0 and held_out["answer_tokens"] > held_out["rows"]  # every token of each block counts
    assert [v["step"] for v in pretrain_run.stats.validations] == [10, 20]


def test_pretrain_folder_is_a_completion_adapter(pretrain_run: TrainResult) -> None:
    folder = read_adapter_folder(pretrain_run.out)
    assert folder.task == "completion"
    assert folder.manifest.train_config["task"] == "pretrain" and folder.manifest.train_config["max_length"] == 24


def test_held_out_figures_per_text_file(pretrain_run: TrainResult) -> None:
    by_data = pretrain_run.manifest.metrics["held_out_by_data"]
    assert list(by_data) == ["rivers.txt", "village.txt"]
    for figures in by_data.values():
        assert figures["adapter"]["loss"] < figures["base"]["loss"] and figures["answer_tokens"] > 0


def test_eval_rebuilds_the_pretrain_figures(pretrain_run: TrainResult) -> None:
    result = evaluate_adapter(pretrain_run.out)
    assert result["task"] == "pretrain" and result["held_out"] == pretrain_run.manifest.metrics["held_out"]
    assert result["held_out_by_data"] == pretrain_run.manifest.metrics["held_out_by_data"]


def test_pretrain_on_a_bundled_set_with_an_encoder_base_is_refused(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from training.errors import ConfigError

    with pytest.raises(ConfigError, match="causal LM"):
        run_training(tiny_config(tiny_bert_dir, "chatterbot:trivia", tmp_path / "x", task="pretrain"), progress=False)


def test_export_of_a_pretrain_adapter_on_text_files(pretrain_run: TrainResult, tmp_path: Path) -> None:
    """Raw text has no prompts: parity decodes from the opening tokens of the held-out documents."""
    from adapters import read_export_folder
    from tests.conftest import export_folder
    from training.export.source import DOCUMENT_PROMPT_TOKENS

    out = export_folder(pretrain_run.out, tmp_path / "pretrain-merged", format="merged", parity_tokens=4)
    assert read_export_folder(out).task == "completion"
    report = read_export_folder(out).parity
    assert report["source"] == (f"opening {DOCUMENT_PROMPT_TOKENS} tokens of held-out documents of "
                                f"{pretrain_run.manifest.train_config['data']}")
    assert report["prompts"] == 4 and report["merged_torch"]["greedy_identical"] == "4/4"
