"""Answer-only labels: the prompt is what the server feeds, the loss covers exactly answer + end-of-turn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from training.data import ChatTurn, CompletionExample
from training.sft_data import IGNORE_INDEX, collate, encode_all, encode_completion, turn_end_ids

QUESTION, ANSWER = "Who was the 37th President of the United States?", "Richard Nixon"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _chat(question: str = QUESTION, answer: str = ANSWER) -> CompletionExample:
    return CompletionExample(question, answer, (ChatTurn("user", question),))


def test_end_of_turn_is_im_end_for_smollm2(tokenizer) -> None:
    assert tokenizer.convert_ids_to_tokens(list(turn_end_ids(tokenizer))) == ["<|im_end|>"]


def test_labels_cover_exactly_the_answer_and_the_end_token(tokenizer) -> None:
    row = encode_completion(tokenizer, _chat(), 256, turn_end_ids(tokenizer))
    answer_ids = [t for t in row.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer_ids) == ANSWER + "<|im_end|>"
    prompt_len = row.labels.index(answer_ids[0])
    assert set(row.labels[:prompt_len]) == {IGNORE_INDEX}
    assert list(row.input_ids[prompt_len:]) == answer_ids, "answer tokens are contiguous after the prompt"
    server_prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    assert list(row.input_ids[:prompt_len]) == list(server_prompt)


def test_raw_prompt_rows_end_with_eos(tokenizer) -> None:
    row = encode_completion(tokenizer, CompletionExample("2+2=", " 4"), 64, turn_end_ids(tokenizer))
    answer_ids = [t for t in row.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer_ids) == " 4" + tokenizer.eos_token
    assert tokenizer.decode(list(row.input_ids[: len(row.input_ids) - len(answer_ids)])) == "2+2="


def test_long_rows_are_cut_on_the_right_and_prompt_only_rows_skipped(tokenizer) -> None:
    long_answer = "word " * 100
    rows, skipped = encode_all(tokenizer, (_chat(answer=long_answer), _chat(question="q " * 200)), 64)
    assert skipped == 1 and len(rows) == 1
    assert len(rows[0].input_ids) == 64 and rows[0].labels[-1] != IGNORE_INDEX


def test_collate_right_pads_with_masked_labels(tokenizer) -> None:
    rows, _ = encode_all(tokenizer, (_chat(), _chat(answer="Nixon, Richard Milhous, in 1969")), 256)
    batch = collate(rows, tokenizer.pad_token_id)
    short = len(rows[0].input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0, short:].sum() == 0 and batch["attention_mask"][0, :short].all()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert torch.equal(batch["input_ids"][0, :short], torch.tensor(rows[0].input_ids))
