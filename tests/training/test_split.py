"""The train/validation split is deterministic per seed, disjoint and complete."""

from __future__ import annotations

import pytest

from training.data import ClassificationExample, Dataset, split_dataset
from training.errors import DatasetError

ROWS = 100


def _dataset(n: int = ROWS) -> Dataset:
    return Dataset("d", "classification", tuple(ClassificationExample(f"row {i}", i % 2) for i in range(n)), ("a", "b"))


def _texts(part: Dataset) -> list[str]:
    return [e.text for e in part.examples]


def test_same_seed_same_split_and_parts_partition_the_rows() -> None:
    first, again = split_dataset(_dataset(), 0.2, 7, 1000), split_dataset(_dataset(), 0.2, 7, 1000)
    assert _texts(first.validation) == _texts(again.validation)
    assert len(first.validation) == 20 and len(first.train) == 80
    assert sorted(_texts(first.train) + _texts(first.validation)) == sorted(_texts(_dataset()))
    assert first.train.labels == ("a", "b")


def test_another_seed_holds_out_other_rows() -> None:
    assert _texts(split_dataset(_dataset(), 0.2, 1, 1000).validation) != _texts(split_dataset(_dataset(), 0.2, 2, 1000).validation)


def test_eval_rows_caps_the_held_out_part() -> None:
    split = split_dataset(_dataset(), 0.5, 0, 10)
    assert (len(split.validation), len(split.train)) == (10, 90)


def test_too_few_rows_to_split() -> None:
    with pytest.raises(DatasetError, match="too few"):
        split_dataset(_dataset(1), 0.5, 0, 10)
