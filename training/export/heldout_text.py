"""Held-out real text for the perplexity and next-token figures of an int8 / int4 completion export.

Two bundled sources, half the token budget each: chatterbot answers (chat replies: what a completion
adapter is asked for) and rotten-tomatoes reviews (plain prose). For a merged export, every row the adapter
trained on (its prompts and answers, or its texts) is left out, so the figures never score memorised text.
The choice is a seeded shuffle (TEXT_SEED) of the remaining distinct rows, taken in order until the source's
share is filled, so every export of the same adapter reads the same text. Each source's rows, separated by
blank lines, make one token stream cut into windows of WINDOW_TOKENS (later tokens see the earlier ones of
their window as context); the stream's partial last window is dropped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from training.data import ClassificationExample, CompletionExample, TextExample, load_dataset, split_dataset
from training.export.source import ExportSource

# (bundled set, its task, what its texts are): chatterbot's answers, rotten-tomatoes' review snippets
TEXT_SOURCES = (("chatterbot", "completion", "answers"), ("rotten-tomatoes", "classification", "reviews"))
TEXT_SEED = 0
WINDOW_TOKENS = 256
ROW_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class HeldOutText:
    """Token windows of equal length, every source's windows in turn."""

    source: str  # for the report
    windows: tuple[tuple[int, ...], ...]

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.windows)


def held_out_text(tokenizer: PreTrainedTokenizerBase, budget_tokens: int,
                  excluded: frozenset[str] = frozenset()) -> HeldOutText:
    """About `budget_tokens` tokens of held-out text (a whole number of windows per source, at least one)."""
    window = min(WINDOW_TOKENS, max(2, budget_tokens // len(TEXT_SOURCES)))
    per_source = max(1, round(budget_tokens / len(TEXT_SOURCES) / window))
    windows: list[tuple[int, ...]] = []
    for name, task, _ in TEXT_SOURCES:
        rows = [text for text in dict.fromkeys(_texts(name, task)) if text not in excluded]
        random.Random(TEXT_SEED).shuffle(rows)
        windows.extend(_windows(tokenizer, rows, window, per_source))
    names = " and ".join(f"{name} {kind}" for name, _, kind in TEXT_SOURCES)
    left_out = ", the adapter's training rows left out" if excluded else ""
    return HeldOutText(f"{names} (seed {TEXT_SEED}{left_out}), windows of {window} tokens", tuple(windows))


def training_texts(source: ExportSource) -> frozenset[str]:
    """Every text the adapter trained on (prompts and answers, or texts): empty when its data is unknown."""
    config = source.config
    if config is None:
        return frozenset()
    dataset = load_dataset(config.data, source.folder.training_task)
    train = split_dataset(dataset, config.val_fraction, config.split_seed, config.eval_rows).train
    texts: set[str] = set()
    for example in train.examples:
        if isinstance(example, CompletionExample):
            texts.update((example.prompt, example.answer))
        elif isinstance(example, (ClassificationExample, TextExample)):
            texts.add(example.text)
    return frozenset(texts)


def _texts(name: str, task: str) -> list[str]:
    dataset = load_dataset(name, task)
    return [e.answer if isinstance(e, CompletionExample) else e.text for e in dataset.examples]  # type: ignore[union-attr]


def _windows(tokenizer: PreTrainedTokenizerBase, rows: list[str], window: int, count: int) -> list[tuple[int, ...]]:
    """Up to `count` windows of `window` tokens from the front of the rows' stream (each row encoded on its
    own, then the separator: rows are encoded only until the windows are full)."""
    separator = tokenizer(ROW_SEPARATOR, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for text in rows:
        if len(ids) >= window * count:
            break
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + separator)
    usable = min(count, len(ids) // window)
    return [tuple(ids[i * window:(i + 1) * window]) for i in range(usable)]
