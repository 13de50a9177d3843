"""Completion SFT: LoRA on a causal LM, loss on the answer tokens only; held-out loss and perplexity
measured with the base alone (before) and with the trained adapter (after)."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from adapters import PreparedBase
from training.config import TrainConfig
from training.data import Dataset, Split
from training.device import model_device, to_device
from training.errors import DatasetError
from training.loop import Validation, train_loop, watched_metric
from training.models import default_target_modules, load_causal_lm, load_tokenizer, prepare_model
from training.output import TrainResult, write_adapter
from training.sft_data import IGNORE_INDEX, EncodedCompletion, collate, encode_all

log = logging.getLogger(__name__)
FIGURE_DIGITS = 4
# (tokenizer, data set, max_length) -> token rows; completion rows here, packed raw text in training.pretrain
Encoder = Callable[[PreTrainedTokenizerBase, Dataset, int], list[EncodedCompletion]]


@torch.no_grad()
def answer_loss(
    model: nn.Module, rows: list[EncodedCompletion], pad_token_id: int, batch_size: int, progress: bool = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """Token-weighted mean cross-entropy over all answer tokens of `rows`, and its perplexity exp(loss).

    Rows are batched in length order so little compute goes to padding; the result does not depend on it.
    """
    model.eval()
    device = model_device(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    total_nll = 0.0
    total_tokens = 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        batch = to_device(collate([rows[i] for i in order[start : start + batch_size]], pad_token_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, S, V]
        targets = batch["labels"][:, 1:]  # token t is predicted from position t-1
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        total_nll += nll.item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    loss = total_nll / max(total_tokens, 1)
    return {
        "rows": len(rows), "answer_tokens": total_tokens,
        "loss": round(loss, FIGURE_DIGITS), "perplexity": round(math.exp(loss), FIGURE_DIGITS),
    }


def before_after(
    model: PeftModel, rows: list[EncodedCompletion], pad_token_id: int, batch_size: int, progress: bool
) -> dict[str, Any]:
    """Held-out figures of the base (adapter disabled) and of base + adapter, on the same rows."""
    with model.disable_adapter():
        base = answer_loss(model, rows, pad_token_id, batch_size, progress, desc="eval base")
    adapted = answer_loss(model, rows, pad_token_id, batch_size, progress, desc="eval adapter")
    return held_out_figures(base, adapted)


def held_out_figures(base: dict[str, Any], adapted: dict[str, Any]) -> dict[str, Any]:
    """{rows, answer_tokens, base: {loss, perplexity}, adapter: {loss, perplexity}}: the manifest's shape."""
    return {
        "rows": adapted["rows"], "answer_tokens": adapted["answer_tokens"],
        "base": {"loss": base["loss"], "perplexity": base["perplexity"]},
        "adapter": {"loss": adapted["loss"], "perplexity": adapted["perplexity"]},
    }


def encode_rows(tokenizer: PreTrainedTokenizerBase, dataset: Dataset, max_length: int) -> list[EncodedCompletion]:
    """Completion rows -> token ids with labels on the answer; rows whose prompt fills max_length are dropped."""
    rows, skipped = encode_all(tokenizer, dataset.examples, max_length)
    if skipped:
        log.warning("%s: %d rows skipped: their prompt alone fills max_length=%d", dataset.name, skipped, max_length)
    if not rows:
        raise DatasetError(f"{dataset.name}: no row fits max_length={max_length}; raise --max-length")
    return rows


def encode_split_part(
    tokenizer: PreTrainedTokenizerBase, split: Split, part: str, max_length: int, encode: Encoder | None = None,
) -> list[EncodedCompletion]:
    return (encode or encode_rows)(tokenizer, getattr(split, part), max_length)


def held_out_by_part(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, parts: tuple[Dataset, ...], max_length: int,
    batch_size: int, encode: Encoder, progress: bool = False,
) -> dict[str, Any]:
    """before_after on each source of a multi-task set, keyed by the source's name."""
    return {_source_name(part): before_after(model, encode(tokenizer, part, max_length), tokenizer.pad_token_id,
                                             batch_size, progress) for part in parts}


def _source_name(part: Dataset) -> str:
    return part.name.removesuffix("[validation]")


def train_completion(
    config: TrainConfig, base: PreparedBase, split: Split, progress: bool = True, encode: Encoder | None = None,
) -> TrainResult:
    """Train a causal-LM LoRA on split.train, evaluate on split.validation, write the adapter folder.

    `encode` turns a data set into token rows: completion rows with the loss on the answer (the default), or
    packed raw-text blocks with the loss on every token (training.pretrain). The folder's task is completion
    either way: that is what the server does with it."""
    encode = encode or encode_rows
    tokenizer = load_tokenizer(base.path)
    torch.manual_seed(config.seed)  # LoRA A init and dropout
    model = load_causal_lm(base)
    config = config.resolved(config.task, default_target_modules(model, config.method))
    train_rows = encode(tokenizer, split.train, config.max_length)
    val_rows = encode(tokenizer, split.validation, config.max_length)
    peft_model = prepare_model(model, config, "completion", base.name)
    pad = tokenizer.pad_token_id
    metric, higher_is_better = watched_metric(config, config.task)

    with peft_model.disable_adapter():
        before = answer_loss(peft_model, val_rows, pad, config.eval_batch_size, progress, desc="eval base")

    def loss_fn(m: nn.Module, batch_rows: list[EncodedCompletion]) -> torch.Tensor:
        # HF shifts labels and averages over answer tokens
        return m(**to_device(collate(batch_rows, pad), model_device(m))).loss

    def validate(m: nn.Module) -> dict[str, float]:
        figures = answer_loss(m, val_rows, pad, config.eval_batch_size)
        return {"loss": figures["loss"], "perplexity": figures["perplexity"]}

    stats = train_loop(peft_model, train_rows, loss_fn, config, progress,
                       validation=Validation(validate, metric, higher_is_better))
    after = answer_loss(peft_model, val_rows, pad, config.eval_batch_size, progress, desc="eval adapter")
    metrics: dict[str, Any] = {"held_out": held_out_figures(before, after),
                               "train": {**stats.summary(), "rows": len(train_rows)}}
    if split.validation_parts:  # base figures per source come from disabling the (frozen-base) adapter
        metrics["held_out_by_data"] = held_out_by_part(peft_model, tokenizer, split.validation_parts,
                                                       config.max_length, config.eval_batch_size, encode)
    return write_adapter(config, base, peft_model, "completion", (), metrics, stats)
