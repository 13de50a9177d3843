"""Continued pre-training (domain adaptation) on raw text: documents -> tokens -> fixed-length blocks,
the loss on every token; held-out loss and perplexity of the base (before) and of the adapter (after).

Packing: each document is tokenized as the tokenizer would for a prompt (its BOS, if it uses one), followed
by EOS so the model sees where a document ends; the token stream of all documents is cut into blocks of
max_length tokens. No padding is wasted, and a block may hold the end of one document and the start of the
next (GPT-2's and nanoGPT's practice). The last, shorter block is kept, so a small file still trains.
Train and validation documents are packed apart, after the split, so no held-out text is trained on.

Training and evaluation reuse the completion path (training.sft): a block is a completion row whose labels
are all of its tokens, and the adapter is a completion adapter to the server.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from adapters import PreparedBase
from training.config import TrainConfig
from training.data import Dataset, Split, TextExample
from training.errors import ConfigError, DatasetError
from training.output import TrainResult
from training.sft import train_completion
from training.sft_data import EncodedCompletion

MIN_BLOCK_TOKENS = 2  # one token predicted from another: the least a block can teach


def document_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """One document's tokens (with the tokenizer's own special tokens, e.g. BOS) ending with EOS."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("continued pre-training needs a tokenizer with an EOS token to mark document ends")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids


def pack_blocks(tokenizer: PreTrainedTokenizerBase, dataset: Dataset, max_length: int) -> list[EncodedCompletion]:
    """The documents of `dataset` as consecutive blocks of max_length tokens (the last may be shorter),
    each labelled with its own tokens (the model shifts them by one)."""
    stream: list[int] = []
    for example in dataset.examples:
        if not isinstance(example, TextExample):
            raise DatasetError(f"{dataset.name}: pretrain needs raw text rows, got {type(example).__name__}")
        stream += document_ids(tokenizer, example.text)
    blocks = [tuple(stream[i : i + max_length]) for i in range(0, len(stream), max_length)]
    blocks = [b for b in blocks if len(b) >= MIN_BLOCK_TOKENS]
    if not blocks:
        raise DatasetError(f"{dataset.name}: too little text to make one block of {MIN_BLOCK_TOKENS}+ tokens")
    return [EncodedCompletion(input_ids=block, labels=block) for block in blocks]


def train_pretrain(config: TrainConfig, base: PreparedBase, split: Split, progress: bool = True) -> TrainResult:
    """Continued pre-training of a LoRA on split.train's text; held-out loss and perplexity on split.validation."""
    return train_completion(config, base, split, progress, encode=pack_blocks)
