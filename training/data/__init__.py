"""Data for training and evaluation: bundled sets by name, or user CSV/JSONL files, split deterministically."""

from __future__ import annotations

from pathlib import Path

from training.data.bundled import BUNDLED_NAMES, chatterbot_topics, is_bundled_name, load_bundled
from training.data.examples import ChatTurn, ClassificationExample, CompletionExample, Dataset
from training.data.files import load_file
from training.data.split import Split, split_dataset
from training.errors import DatasetError


def load_dataset(name_or_path: str, task: str) -> Dataset:
    """A bundled set by name, or a CSV/JSONL file, checked to fit `task` (completion or classification)."""
    if is_bundled_name(name_or_path):
        dataset = load_bundled(name_or_path)
        if dataset.task != task:
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
    "Split", "chatterbot_topics", "load_dataset", "load_file", "split_dataset",
]
