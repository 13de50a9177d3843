"""`training eval`: load base + adapter with PEFT and compute the held-out figures training reports.

The adapter's manifest carries its train_config, so the same split (val_fraction, split_seed, eval_rows),
max_length and base are rebuilt from the folder alone; a stock PEFT folder without a manifest works too,
given --base and --data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import PeftModel

from adapters import BaseSignature, read_adapter_folder, resolve_base, validate_against_base
from training.classify import evaluate_classifier
from training.config import TrainConfig
from training.data import Split, load_dataset, relabel, split_dataset
from training.errors import ConfigError
from training.models import load_causal_lm, load_sequence_classifier, load_tokenizer
from training.pretrain import pack_blocks
from training.sft import before_after, encode_rows, held_out_by_part

SPLITS = ("validation", "all")
PRETRAIN = "pretrain"
__all__ = ["evaluate_adapter", "relabel"]  # relabel lives in training.data; exports and benchmarks import it here


def evaluate_adapter(
    adapter_dir: str | Path, data: str | None = None, base: str | None = None, split: str = "validation",
    cache_dir: Path | None = None, batch_size: int | None = None, progress: bool = False,
) -> dict[str, Any]:
    """Held-out figures of the adapter at `adapter_dir` on `data` (default: the data it was trained on).

    split="validation" scores the rows the training run held out (same seed and fraction); "all" scores
    every row, for a data set the adapter never saw.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    folder = read_adapter_folder(adapter_dir)
    saved = dict(folder.manifest.train_config) if folder.manifest else {}
    base_ref = base or saved.get("base") or (folder.manifest.base_name if folder.manifest else None)
    data_ref = data or saved.get("data")
    if not base_ref:
        raise ConfigError("this adapter has no manifest naming its base; pass --base")
    if not data_ref:
        raise ConfigError("this adapter has no manifest naming its data; pass --data")
    # a pretrain adapter is a completion adapter to the server; its data is raw text all the same
    task = PRETRAIN if folder.task == "completion" and saved.get("task") == PRETRAIN else folder.task
    config = TrainConfig.from_manifest(
        saved, base=base_ref, data=data_ref, out=Path(adapter_dir), task=task,
        eval_batch_size=batch_size, cache_dir=cache_dir,
    )
    prepared = resolve_base(config.base, config.cache_dir)
    dataset = load_dataset(config.data, task)
    tokenizer = load_tokenizer(prepared.path)
    labels = folder.labels or dataset.labels
    if folder.task == "completion":
        model = load_causal_lm(prepared)
    else:
        dataset = relabel(dataset, labels)
        model = load_sequence_classifier(prepared, labels, tokenizer.pad_token_id)
    validate_against_base(folder, BaseSignature.of(model, prepared.name, prepared.fingerprint))
    peft_model = PeftModel.from_pretrained(model, str(folder.path))
    peft_model.eval()
    if split == "validation":
        parts = split_dataset(dataset, config.val_fraction, config.split_seed, config.eval_rows)
    else:
        parts = Split(train=dataset, validation=dataset, validation_parts=dataset.parts)
    max_length = config.resolved(task, ()).max_length  # the saved value, else the task default
    by_data: dict[str, Any] = {}
    if folder.task == "completion":
        encode = pack_blocks if task == PRETRAIN else encode_rows
        rows = encode(tokenizer, parts.validation, max_length)
        figures = before_after(peft_model, rows, tokenizer.pad_token_id, config.eval_batch_size, progress)
        by_data = held_out_by_part(peft_model, tokenizer, parts.validation_parts, max_length,
                                   config.eval_batch_size, encode)
    else:
        figures = evaluate_classifier(peft_model, tokenizer, parts.validation, labels, max_length,
                                      config.eval_batch_size, progress)
        by_data = {part.name.removesuffix("[validation]"): evaluate_classifier(
            peft_model, tokenizer, part, labels, max_length, config.eval_batch_size)
            for part in parts.validation_parts}
    result = {
        "adapter": str(folder.path), "task": task, "base": prepared.name, "data": config.data,
        "split": split, "held_out": figures,
    }
    if by_data:
        result["held_out_by_data"] = by_data
    return result
