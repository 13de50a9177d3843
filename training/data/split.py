"""A deterministic train / validation split: the same rows are held out for the same seed, every run."""

from __future__ import annotations

import random
from dataclasses import dataclass

from training.data.examples import Dataset
from training.errors import DatasetError

MIN_TRAIN_ROWS = 1


@dataclass(frozen=True)
class Split:
    """`validation_parts` holds each source's held-out rows for a multi-task set (empty for a single set)."""

    train: Dataset
    validation: Dataset
    validation_parts: tuple[Dataset, ...] = ()


def split_dataset(dataset: Dataset, val_fraction: float, seed: int, max_eval_rows: int) -> Split:
    """Shuffle row indices with `seed`; the first round(n * val_fraction) (at most max_eval_rows, at least 1)
    are held out, the rest train. Rows keep their original order inside each part.

    A multi-task set is split part by part with the same seed and cap, then the parts are concatenated:
    each part holds out exactly the rows a run on it alone would."""
    if dataset.parts:
        splits = [split_dataset(part, val_fraction, seed, max_eval_rows) for part in dataset.parts]
        return Split(train=_concat(dataset, [s.train for s in splits], "train"),
                     validation=_concat(dataset, [s.validation for s in splits], "validation"),
                     validation_parts=tuple(s.validation for s in splits))
    n = len(dataset)
    n_val = min(max(1, round(n * val_fraction)), max_eval_rows)
    if n - n_val < MIN_TRAIN_ROWS:
        raise DatasetError(f"{dataset.name}: {n} rows are too few to hold {n_val} out for validation and still train")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return Split(train=dataset.subset(train, "train"), validation=dataset.subset(held_out, "validation"))


def _concat(whole: Dataset, parts: list[Dataset], suffix: str) -> Dataset:
    examples = tuple(e for part in parts for e in part.examples)
    return Dataset(f"{whole.name}[{suffix}]", whole.task, examples, whole.labels, tuple(parts))
