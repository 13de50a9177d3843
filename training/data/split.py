"""A deterministic train / validation split: the same rows are held out for the same seed, every run."""

from __future__ import annotations

import random
from dataclasses import dataclass

from training.data.examples import Dataset
from training.errors import DatasetError

MIN_TRAIN_ROWS = 1


@dataclass(frozen=True)
class Split:
    train: Dataset
    validation: Dataset


def split_dataset(dataset: Dataset, val_fraction: float, seed: int, max_eval_rows: int) -> Split:
    """Shuffle row indices with `seed`; the first round(n * val_fraction) (at most max_eval_rows, at least 1)
    are held out, the rest train. Rows keep their original order inside each part."""
    n = len(dataset)
    n_val = min(max(1, round(n * val_fraction)), max_eval_rows)
    if n - n_val < MIN_TRAIN_ROWS:
        raise DatasetError(f"{dataset.name}: {n} rows are too few to hold {n_val} out for validation and still train")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return Split(train=dataset.subset(train, "train"), validation=dataset.subset(held_out, "validation"))
