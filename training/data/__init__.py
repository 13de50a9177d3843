"""Data for training and evaluation: bundled sets by name, or user CSV/JSONL/TXT files, split deterministically.

`--data a,b` combines several sets into one run (training.data.multi)."""

from __future__ import annotations

from pathlib import Path

from training.data.bundled import BUNDLED_NAMES, chatterbot_topics, is_bundled_name, load_bundled
from training.data.examples import ChatTurn, ClassificationExample, CompletionExample, Dataset, TextExample
from training.data.files import load_file
from training.data.multi import as_raw_text, combine, data_names, relabel
from training.data.split import Split, split_dataset
from training.errors import DatasetError


def load_dataset(name_or_path: str, task: str) -> Dataset:
    """One or several (`a,b`) bundled sets or files, checked to fit `task` (completion, classification, pretrain).

    For pretrain, any bundled set serves as raw text (its texts, or its questions and answers)."""
    names = data_names(name_or_path)
    if len(names) == 1:
        return _load_one(names[0], task)
    return combine([_load_one(name, task) for name in names])


def _load_one(name_or_path: str, task: str) -> Dataset:
    if is_bundled_name(name_or_path):
        dataset = load_bundled(name_or_path)
        if task == "pretrain":
            dataset = as_raw_text(dataset)
        elif dataset.task != task:
            raise DatasetError(f"data set {name_or_path!r} is for {dataset.task}, but the task is {task}")
        if not dataset.examples:
            raise DatasetError(f"data set {name_or_path!r} has no rows")
        return dataset
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise DatasetError(
            f"{name_or_path!r} is neither a bundled data set ({', '.join(BUNDLED_NAMES)}) nor an existing file"
        )
    return load_file(path, task)


__all__ = [
    "BUNDLED_NAMES", "ChatTurn", "ClassificationExample", "CompletionExample", "Dataset", "DatasetError",
    "Split", "TextExample", "chatterbot_topics", "data_names", "load_dataset", "load_file", "relabel",
    "split_dataset",
]
