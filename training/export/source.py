"""What an export starts from: the adapter on its base (PEFT, unmerged: the torch reference), and the rows
the parity report is computed on.

Parity rows are the adapter's own held-out rows, rebuilt exactly as `training eval` rebuilds them (the
manifest's data, val_fraction, split_seed and eval_rows), cut to the first N. A stock PEFT folder without
a manifest, and no --data, falls back to a few fixed probe texts (no accuracy figure then).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from adapters import (AdapterFolder, BaseSignature, PreparedBase, folder_digest, read_adapter_folder, resolve_base,
                      validate_against_base)
from training.config import DEFAULT_MAX_LENGTH, TrainConfig
from training.data import ClassificationExample, CompletionExample, load_dataset, split_dataset
from training.errors import ConfigError
from training.evaluate import relabel
from training.export.options import ExportOptions
from training.models import load_causal_lm, load_sequence_classifier, load_tokenizer
from training.sft_data import prompt_ids

log = logging.getLogger(__name__)

PROBE_TEXTS = (
    "A moving, beautifully acted film.", "Dull, slow and far too long.", "It was fine, I suppose.",
    "The best thing I have seen all year!", "I want those two hours back.", "An odd mix of charm and tedium.",
    "Nothing new, but the cast makes it work.", "What a mess.",
)
PROBE_PROMPTS = ("What is a computer?", "Tell me about the sea.", "How do I reset my password?", "Who are you?")


@dataclass(frozen=True)
class ParityRows:
    """Classification: texts (+ gold label indices when known). Completion: prompt token ids."""

    source: str  # where the rows come from, for the report
    texts: tuple[str, ...] = ()
    gold: tuple[int, ...] | None = None
    prompts: tuple[tuple[int, ...], ...] = ()


@dataclass
class ExportSource:
    folder: AdapterFolder
    base: PreparedBase
    tokenizer: PreTrainedTokenizerBase
    model: PeftModel  # base + adapter, unmerged, eval mode: the torch reference
    labels: tuple[str, ...]
    max_length: int  # classification: tokens per text, as training and eval cut them
    rows: ParityRows

    @property
    def task(self) -> str:
        return self.folder.task

    @property
    def rank(self) -> int:
        return max(w.rank for w in self.folder.lora.values())

    def digest(self) -> str:
        return folder_digest(self.folder.path)


def load_source(options: ExportOptions) -> ExportSource:
    """Read and validate the adapter, load it on its base with PEFT, and pick the parity rows."""
    folder = read_adapter_folder(options.adapter_dir)
    saved = dict(folder.manifest.train_config) if folder.manifest else {}
    base_ref = options.base or saved.get("base") or (folder.manifest.base_name if folder.manifest else None)
    if not base_ref:
        raise ConfigError("this adapter has no manifest naming its base; pass --base")
    base = resolve_base(base_ref, options.cache_dir)
    tokenizer = load_tokenizer(base.path)
    labels: tuple[str, ...] = ()
    if folder.task == "completion":
        model = load_causal_lm(base)
    else:
        labels = folder.labels or _labels_from_head(folder)
        model = load_sequence_classifier(base, labels, tokenizer.pad_token_id)
    validate_against_base(folder, BaseSignature.of(model, base.name, base.fingerprint))
    peft_model = PeftModel.from_pretrained(model, str(folder.path)).eval()
    data = options.data or saved.get("data")
    config = None
    if data:
        config = TrainConfig.from_manifest(saved, base=base_ref, data=data, out=Path(options.adapter_dir),
                                           task=folder.task, cache_dir=options.cache_dir)
    max_length = (config.resolved(folder.task, ()).max_length if config is not None
                  else DEFAULT_MAX_LENGTH[folder.task])
    rows = _parity_rows(folder, config, tokenizer, labels, options)
    return ExportSource(folder, base, tokenizer, peft_model, labels, max_length, rows)


def _labels_from_head(folder: AdapterFolder) -> tuple[str, ...]:
    for key in ("classifier.weight", "score.weight"):
        weight = folder.extra.get(key)
        if weight is not None and weight.dim() == 2:
            return tuple(f"LABEL_{i}" for i in range(weight.shape[0]))
    raise ConfigError("classification adapter has no head (classifier.weight or score.weight) to export")


def _parity_rows(folder: AdapterFolder, config: TrainConfig | None, tokenizer: PreTrainedTokenizerBase,
                 labels: tuple[str, ...], options: ExportOptions) -> ParityRows:
    if config is None:
        log.warning("no data set known for this adapter (pass --data): parity is checked on probe rows")
        if folder.task == "classification":
            return ParityRows("probe texts", texts=PROBE_TEXTS[: options.parity_rows])
        return ParityRows("probe prompts", prompts=tuple(
            tuple(_probe_prompt(tokenizer, p)) for p in PROBE_PROMPTS[: options.parity_prompts]))
    dataset = load_dataset(config.data, folder.task)
    if folder.task == "classification":
        dataset = relabel(dataset, labels)
    held_out = split_dataset(dataset, config.val_fraction, config.split_seed, config.eval_rows).validation
    source = f"held-out rows of {config.data}"
    if folder.task == "classification":
        examples: list[ClassificationExample] = list(held_out.examples)[: options.parity_rows]  # type: ignore[assignment]
        return ParityRows(source, texts=tuple(e.text for e in examples), gold=tuple(e.label for e in examples))
    rows: list[CompletionExample] = list(held_out.examples)[: options.parity_prompts]  # type: ignore[assignment]
    return ParityRows(source, prompts=tuple(tuple(prompt_ids(tokenizer, e)) for e in rows))


def _probe_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    if tokenizer.chat_template is not None:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True))
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
