"""One entry point for every training run: check the method, resolve base, task and data, dispatch."""

from __future__ import annotations

import dataclasses

from adapters import resolve_base
from training.classify import train_classifier
from training.config import AUTO, IMPLEMENTED_METHODS, TrainConfig
from training.data import load_dataset, split_dataset
from training.errors import MethodNotImplementedError
from training.models import default_task
from training.output import TrainResult
from training.sft import train_completion


def run_training(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train `config.method` on `config.data` over `config.base` and write the adapter folder at config.out.

    Raises TrainingError (and subclasses) or adapters.BaseNotFoundError for anything the user can fix.
    """
    if config.method not in IMPLEMENTED_METHODS:
        raise MethodNotImplementedError(
            f"method {config.method!r} is not implemented yet; available: {', '.join(IMPLEMENTED_METHODS)}"
        )
    base = resolve_base(config.base, config.cache_dir)
    task = default_task(base) if config.task == AUTO else config.task
    config = dataclasses.replace(config, task=task)
    dataset = load_dataset(config.data, task)
    split = split_dataset(dataset, config.val_fraction, config.split_seed, config.eval_rows)
    if task == "completion":
        return train_completion(config, base, split, progress)
    return train_classifier(config, base, split, progress)
