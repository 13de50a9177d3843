"""One entry point for every training run: resolve the device, base, task and data, dispatch (the
trainer writes the adapter folder with its report), then drop the checkpoints the run no longer needs."""

from __future__ import annotations

import dataclasses
from typing import Callable

from adapters import PreparedBase, resolve_base
from training.checkpoints import find_resume_checkpoint, remove_checkpoints
from training.classify import train_classifier
from training.config import AUTO, TrainConfig
from training.data import Split, load_dataset, split_dataset
from training.device import choose_compute
from training.models import default_task
from training.output import TrainResult
from training.pretrain import train_pretrain
from training.sft import train_completion

Trainer = Callable[[TrainConfig, PreparedBase, Split, bool], TrainResult]
TRAINERS: dict[str, Trainer] = {
    "completion": train_completion,
    "classification": train_classifier,
    "pretrain": train_pretrain,
}


def run_training(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train `config.method` on `config.data` over `config.base` and write the adapter folder at config.out
    (and OUT/report/).

    The device is chosen once, here (training.device: `auto` becomes cuda or cpu, and a device, precision or
    optimizer this machine cannot run is refused before anything loads); the trainers get it as config.device.
    Everything the user can get wrong (the data, the resume point) is checked before anything is written, and
    the adapter folder (its report included) is replaced atomically: a failed run leaves an earlier adapter
    and its checkpoints as they were. Raises TrainingError (and subclasses) or adapters.BaseNotFoundError for
    what the user can fix.
    """
    compute = choose_compute(config)
    base = resolve_base(config.base, config.cache_dir)
    task = default_task(base) if config.task == AUTO else config.task
    config = dataclasses.replace(config, task=task, device=str(compute.device))
    find_resume_checkpoint(config)  # a bad --resume fails now, not after the data and the model have loaded
    dataset = load_dataset(config.data, task)
    split = split_dataset(dataset, config.val_fraction, config.split_seed, config.eval_rows)
    result = TRAINERS[task](config, base, split, progress)
    if config.checkpoint_every:
        remove_checkpoints(config.out)
    return result
