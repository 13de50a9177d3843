"""What an export starts from: the trained folder on its base (any method but prompt learning; for PEFT
methods the adapter unmerged: the torch reference), and the rows the parity report is computed on.

Parity rows are the adapter's own held-out rows, rebuilt exactly as `training eval` rebuilds them (the
manifest's data, val_fraction, split_seed and eval_rows), cut to the first N. For a pretrain adapter, whose
data is raw text, the prompts are the opening tokens of its held-out documents (the export should continue
a text as the adapter learned to). A stock PEFT folder without a manifest, and no --data, falls back to a
few fixed probe texts (no accuracy figure then).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from adapters import PreparedBase, resolve_base
from training.config import DEFAULT_MAX_LENGTH, TrainConfig
from training.data import ClassificationExample, CompletionExample, TextExample, load_dataset, split_dataset
from training.errors import ConfigError
from training.evaluate import relabel
from training.export.options import ExportOptions
from training.models import load_tokenizer
from training.sft_data import prompt_ids
from training.trained_folder import (PRETRAIN, PROMPT_LEARNING_METHODS, TrainedFolder, load_trained,
                                     read_trained_folder, task_model)

log = logging.getLogger(__name__)

PROBE_TEXTS = (
    "A moving, beautifully acted film.", "Dull, slow and far too long.", "It was fine, I suppose.",
    "The best thing I have seen all year!", "I want those two hours back.", "An odd mix of charm and tedium.",
    "Nothing new, but the cast makes it work.", "What a mess.",
)
PROBE_PROMPTS = ("What is a computer?", "Tell me about the sea.", "How do I reset my password?", "Who are you?")
DOCUMENT_PROMPT_TOKENS = 16  # a held-out document's opening tokens: a pretrain adapter's parity prompt
# qlora's LoRA was trained over a 4-bit copy of the base; an export merges it into the full-precision base
# (as the server serves it), so it is loaded as the LoRA folder it is
EXPORT_RELOAD_AS = {"qlora": "lora"}


@dataclass(frozen=True)
class ParityRows:
    """Classification: texts (+ gold label indices when known). Completion: prompt token ids."""

    source: str  # where the rows come from, for the report
    texts: tuple[str, ...] = ()
    gold: tuple[int, ...] | None = None
    prompts: tuple[tuple[int, ...], ...] = ()


@dataclass
class ExportSource:
    folder: TrainedFolder
    base: PreparedBase
    tokenizer: PreTrainedTokenizerBase
    model: nn.Module  # the trained model in eval mode, the torch reference: PEFT unmerged, or freeze's / full's HF model
    labels: tuple[str, ...]
    max_length: int  # classification: tokens per text, as training and eval cut them
    rows: ParityRows
    config: TrainConfig | None = None  # the adapter's training settings when its data is known (its split)

    @property
    def task(self) -> str:
        return self.folder.task

    @property
    def rank(self) -> int:
        return self.folder.rank

    def digest(self) -> str:
        return self.folder.digest()


def load_source(options: ExportOptions) -> ExportSource:
    """Read and check the folder, load it on its base, and pick the parity rows."""
    folder = read_trained_folder(options.adapter_dir)
    if folder.method in PROMPT_LEARNING_METHODS:
        raise ConfigError(
            f"a {folder.method!r} folder cannot be merged into its base: prompt learning puts trained virtual "
            "tokens (or per-layer prefixes) in front of what the base sees and changes no weight, so there is no "
            "merged model to export; `training eval` scores the folder, and the server serves prompt, prefix "
            "and ptuning folders for completion as they are")
    saved = folder.train_config
    base_ref = folder.base_ref(options.base)
    base = resolve_base(base_ref, options.cache_dir)
    tokenizer = load_tokenizer(base.path)
    labels: tuple[str, ...] = ()
    if folder.task == "classification":
        labels = folder.labels or folder.head_labels()
    model = task_model(load_trained(folder, base, tokenizer, labels, EXPORT_RELOAD_AS.get(folder.method)))
    data = options.data or saved.get("data")
    config = None
    if data:
        config = TrainConfig.from_manifest(saved, base=base_ref, data=data, out=Path(options.adapter_dir),
                                           task=folder.training_task, cache_dir=options.cache_dir)
    max_length = (config.resolved(folder.training_task, ()).max_length if config is not None
                  else DEFAULT_MAX_LENGTH[folder.task])
    rows = _parity_rows(folder, config, tokenizer, labels, options)
    return ExportSource(folder, base, tokenizer, model, labels, max_length, rows, config)


def _parity_rows(folder: TrainedFolder, config: TrainConfig | None, tokenizer: PreTrainedTokenizerBase,
                 labels: tuple[str, ...], options: ExportOptions) -> ParityRows:
    if config is None:
        log.warning("no data set known for this adapter (pass --data): parity is checked on probe rows")
        if folder.task == "classification":
            return ParityRows("probe texts", texts=PROBE_TEXTS[: options.parity_rows])
        return ParityRows("probe prompts", prompts=tuple(
            tuple(_probe_prompt(tokenizer, p)) for p in PROBE_PROMPTS[: options.parity_prompts]))
    task = folder.training_task
    dataset = load_dataset(config.data, task)
    if task == "classification":
        dataset = relabel(dataset, labels)
    held_out = split_dataset(dataset, config.val_fraction, config.split_seed, config.eval_rows).validation
    source = f"held-out rows of {config.data}"
    if task == "classification":
        examples: list[ClassificationExample] = list(held_out.examples)[: options.parity_rows]  # type: ignore[assignment]
        return ParityRows(source, texts=tuple(e.text for e in examples), gold=tuple(e.label for e in examples))
    if task == PRETRAIN:
        documents: list[TextExample] = list(held_out.examples)[: options.parity_prompts]  # type: ignore[assignment]
        return ParityRows(f"opening {DOCUMENT_PROMPT_TOKENS} tokens of held-out documents of {config.data}",
                          prompts=tuple(_document_prompt(tokenizer, d.text) for d in documents))
    rows: list[CompletionExample] = list(held_out.examples)[: options.parity_prompts]  # type: ignore[assignment]
    return ParityRows(source, prompts=tuple(tuple(prompt_ids(tokenizer, e)) for e in rows))


def _document_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    """A document's first tokens, encoded as pretraining encoded it (the tokenizer's own BOS, if any)."""
    return tuple(tokenizer(text, add_special_tokens=True)["input_ids"][:DOCUMENT_PROMPT_TOKENS])


def _probe_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    if tokenizer.chat_template is not None:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True))
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
