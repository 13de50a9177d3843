"""Classification: LoRA on an encoder (or decoder) with a fresh linear head, cross-entropy on the label;
held-out accuracy, precision, recall, F1 (macro and per class) and the confusion matrix."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from adapters import PreparedBase
from training.config import TrainConfig
from training.data import ClassificationExample, Dataset, Split
from training.device import model_device, to_device
from training.loop import Validation, train_loop, watched_metric
from training.metrics import DIGITS, classification_report
from training.models import default_target_modules, load_sequence_classifier, load_tokenizer, prepare_model
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
    return predict_with_loss(model, tokenizer, texts, None, max_length, batch_size, progress)[0]


@torch.no_grad()
def predict_with_loss(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[int] | None,
    max_length: int, batch_size: int, progress: bool = False,
) -> tuple[list[int], float | None]:
    """Predicted class index per text and, given the true `labels`, the mean cross-entropy over the rows."""
    model.eval()
    device = model_device(model)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    predictions = [0] * len(texts)
    total_nll = 0.0
    for start in tqdm(range(0, len(order), batch_size), desc="eval", unit="batch", disable=not progress, leave=False):
        chunk = order[start : start + batch_size]
        inputs = to_device(encode_texts(tokenizer, [texts[i] for i in chunk], max_length), device)
        logits = model(**inputs).logits  # [B, num_labels]
        for i, label in zip(chunk, logits.argmax(dim=-1).tolist()):
            predictions[i] = label
        if labels is not None:
            targets = torch.tensor([labels[i] for i in chunk], device=device)
            total_nll += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
    return predictions, (total_nll / max(len(texts), 1) if labels is not None else None)


def evaluate_classifier(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, labels: tuple[str, ...],
    max_length: int, batch_size: int, progress: bool = False,
) -> dict[str, Any]:
    """classification_report of `model` on `dataset`, whose label indices follow `labels`."""
    examples: list[ClassificationExample] = list(dataset.examples)  # type: ignore[arg-type]
    predicted = predict(model, tokenizer, [e.text for e in examples], max_length, batch_size, progress)
    return classification_report([e.label for e in examples], predicted, labels)


def classification_loss(
    tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Callable[[nn.Module, list[ClassificationExample]], torch.Tensor]:
    """The training step's loss: tokenize the batch's texts (right-padded, cut at max_length), cross-entropy
    on the labels. The batch is tokenized inside the step, so step timings (bench_training_speed) include it,
    then moved to the model's device."""

    def loss_fn(model: nn.Module, batch: list[ClassificationExample]) -> torch.Tensor:
        device = model_device(model)
        inputs = to_device(encode_texts(tokenizer, [e.text for e in batch], max_length), device)
        return model(**inputs, labels=torch.tensor([e.label for e in batch], device=device)).loss

    return loss_fn


def train_classifier(config: TrainConfig, base: PreparedBase, split: Split, progress: bool = True) -> TrainResult:
    """Train a classification LoRA (+ head) on split.train, evaluate on split.validation, write the folder."""
    labels = split.train.labels
    tokenizer = load_tokenizer(base.path)
    torch.manual_seed(config.seed)  # head and LoRA A init, dropout
    model = load_sequence_classifier(base, labels, tokenizer.pad_token_id)
    config = config.resolved("classification", default_target_modules(model, config.method))
    peft_model = prepare_model(model, config, "classification", base.name)
    train_rows: list[ClassificationExample] = list(split.train.examples)  # type: ignore[arg-type]
    val_rows: list[ClassificationExample] = list(split.validation.examples)  # type: ignore[arg-type]
    metric, higher_is_better = watched_metric(config, "classification")

    def validate(m: nn.Module) -> dict[str, float]:
        gold = [e.label for e in val_rows]
        predicted, loss = predict_with_loss(m, tokenizer, [e.text for e in val_rows], gold, config.max_length,
                                            config.eval_batch_size)
        report = classification_report(gold, predicted, labels)
        return {"loss": round(loss or 0.0, DIGITS), "accuracy": report["accuracy"], "f1_macro": report["f1_macro"]}

    stats = train_loop(peft_model, train_rows, classification_loss(tokenizer, config.max_length), config, progress,
                       validation=Validation(validate, metric, higher_is_better))
    report = evaluate_classifier(peft_model, tokenizer, split.validation, labels, config.max_length,
                                 config.eval_batch_size, progress)
    metrics: dict[str, Any] = {"held_out": report, "train": {**stats.summary(), "rows": len(train_rows)}}
    if split.validation_parts:
        metrics["held_out_by_data"] = {
            part.name.removesuffix("[validation]"): evaluate_classifier(
                peft_model, tokenizer, part, labels, config.max_length, config.eval_batch_size)
            for part in split.validation_parts}
    return write_adapter(config, base, peft_model, "classification", labels, metrics, stats)
