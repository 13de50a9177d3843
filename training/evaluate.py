"""`training eval`: load base + trained folder (any method) and compute the held-out figures training reports.

The folder's manifest carries its train_config, so the same split (val_fraction, split_seed, eval_rows),
max_length and base are rebuilt from the folder alone; a stock PEFT folder without a manifest works too,
given --base and --data. Every method's folder loads as training.trained_folder loads it: PEFT folders
(lora, qlora, ia3, prompt, prefix, ptuning) with PEFT, freeze folders as their trained tensors over a fresh
base, full folders as the complete model they are, beside the base for the "before" figures. `device` is where the model computes (auto: cuda where there is one);
evaluation runs in fp32 on any device, so its figures do not depend on the precision a run trained in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters import resolve_base
from training.classify import evaluate_classifier
from training.config import AUTO, TrainConfig
from training.data import Split, load_dataset, relabel, split_dataset
from training.device import resolve_device
from training.errors import ConfigError
from training.models import load_tokenizer
from training.pretrain import pack_blocks
from training.sft import before_after, encode_rows, held_out_by_part
from training.trained_folder import PRETRAIN, load_trained, read_trained_folder

SPLITS = ("validation", "all")
__all__ = ["evaluate_adapter", "relabel"]  # relabel lives in training.data; exports and benchmarks import it here


def evaluate_adapter(
    adapter_dir: str | Path, data: str | None = None, base: str | None = None, split: str = "validation",
    cache_dir: Path | None = None, batch_size: int | None = None, progress: bool = False, device: str = AUTO,
) -> dict[str, Any]:
    """Held-out figures of the folder at `adapter_dir` (any method's) on `data` (default: the data it was
    trained on).

    split="validation" scores the rows the training run held out (same seed and fraction); "all" scores
    every row, for a data set the adapter never saw.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    folder = read_trained_folder(adapter_dir)
    saved = folder.train_config
    base_ref = folder.base_ref(base)
    data_ref = data or saved.get("data")
    if not data_ref:
        raise ConfigError("this adapter has no manifest naming its data; pass --data")
    task = folder.training_task  # a pretrain folder is a completion folder to the server; its data is raw text
    config = TrainConfig.from_manifest(
        saved, base=base_ref, data=data_ref, out=Path(adapter_dir), task=task,
        eval_batch_size=batch_size, cache_dir=cache_dir, device=device,
    )
    compute_on = resolve_device(config.device)  # a device this machine lacks is refused before anything loads
    prepared = resolve_base(config.base, config.cache_dir)
    dataset = load_dataset(config.data, task)
    tokenizer = load_tokenizer(prepared.path)
    labels = folder.labels or dataset.labels
    if folder.task == "classification":
        dataset = relabel(dataset, labels)
    model = load_trained(folder, prepared, tokenizer, labels, device=compute_on)
    if split == "validation":
        parts = split_dataset(dataset, config.val_fraction, config.split_seed, config.eval_rows)
    else:
        parts = Split(train=dataset, validation=dataset, validation_parts=dataset.parts)
    max_length = config.resolved(task, ()).max_length  # the saved value, else the task default
    by_data: dict[str, Any] = {}
    if folder.task == "completion":
        encode = pack_blocks if task == PRETRAIN else encode_rows
        rows = encode(tokenizer, parts.validation, max_length)
        figures = before_after(model, rows, tokenizer.pad_token_id, config.eval_batch_size, progress)
        by_data = held_out_by_part(model, tokenizer, parts.validation_parts, max_length,
                                   config.eval_batch_size, encode)
    else:
        figures = evaluate_classifier(model, tokenizer, parts.validation, labels, max_length,
                                      config.eval_batch_size, progress)
        by_data = {part.name.removesuffix("[validation]"): evaluate_classifier(
            model, tokenizer, part, labels, max_length, config.eval_batch_size)
            for part in parts.validation_parts}
    result = {
        "adapter": str(folder.path), "method": folder.method, "task": task, "base": prepared.name,
        "data": config.data, "split": split, "held_out": figures,
    }
    if by_data:
        result["held_out_by_data"] = by_data
    return result
