"""Classification: LoRA on an encoder (or decoder) with a fresh linear head, cross-entropy on the label;
held-out accuracy, precision, recall, F1 (macro and per class) and the confusion matrix."""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from adapters import PreparedBase
from training.config import TrainConfig
from training.data import ClassificationExample, Dataset, Split
from training.loop import shuffled_batches, train_loop
from training.metrics import classification_report
from training.models import add_lora, default_target_modules, load_sequence_classifier, load_tokenizer
from training.output import TrainResult, write_adapter


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """[B] texts -> input_ids / attention_mask [B, S], right-padded and cut at max_length (as the server does)."""
    tokenizer.padding_side = "right"
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@torch.no_grad()
def predict(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int,
    progress: bool = False,
) -> list[int]:
    """Predicted class index per text; batches go in length order to spend little on padding."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    predictions = [0] * len(texts)
    for start in tqdm(range(0, len(order), batch_size), desc="eval", unit="batch", disable=not progress, leave=False):
        chunk = order[start : start + batch_size]
        logits = model(**encode_texts(tokenizer, [texts[i] for i in chunk], max_length)).logits  # [B, num_labels]
        for i, label in zip(chunk, logits.argmax(dim=-1).tolist()):
            predictions[i] = label
    return predictions


def evaluate_classifier(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, labels: tuple[str, ...],
    max_length: int, batch_size: int, progress: bool = False,
) -> dict[str, Any]:
    """classification_report of `model` on `dataset`, whose label indices follow `labels`."""
    examples: list[ClassificationExample] = list(dataset.examples)  # type: ignore[arg-type]
    predicted = predict(model, tokenizer, [e.text for e in examples], max_length, batch_size, progress)
    return classification_report([e.label for e in examples], predicted, labels)


def train_classifier(config: TrainConfig, base: PreparedBase, split: Split, progress: bool = True) -> TrainResult:
    """Train a classification LoRA (+ head) on split.train, evaluate on split.validation, write the folder."""
    labels = split.train.labels
    tokenizer = load_tokenizer(base.path)
    torch.manual_seed(config.seed)  # head and LoRA A init, dropout
    model = load_sequence_classifier(base, labels, tokenizer.pad_token_id)
    config = config.resolved("classification", default_target_modules(model))
    peft_model: PeftModel = add_lora(model, config, "classification", base.name)
    train_rows: list[ClassificationExample] = list(split.train.examples)  # type: ignore[arg-type]

    def loss_fn(m: nn.Module, batch: list[ClassificationExample]) -> torch.Tensor:
        inputs = encode_texts(tokenizer, [e.text for e in batch], config.max_length)
        return m(**inputs, labels=torch.tensor([e.label for e in batch])).loss

    stats = train_loop(peft_model, shuffled_batches(train_rows, config.batch_size, config.seed), loss_fn, config, progress)
    report = evaluate_classifier(peft_model, tokenizer, split.validation, labels, config.max_length,
                                 config.eval_batch_size, progress)
    metrics = {"held_out": report, "train": {**stats.summary(), "rows": len(train_rows)}}
    return write_adapter(config, base, peft_model, "classification", labels, metrics, stats)
