"""Completion SFT: LoRA on a causal LM, loss on the answer tokens only; held-out loss and perplexity
measured with the base alone (before) and with the trained adapter (after)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from adapters import PreparedBase
from training.config import TrainConfig
from training.data import Split
from training.errors import DatasetError
from training.loop import shuffled_batches, train_loop
from training.models import add_lora, default_target_modules, load_causal_lm, load_tokenizer
from training.output import TrainResult, write_adapter
from training.sft_data import IGNORE_INDEX, EncodedCompletion, collate, encode_all

log = logging.getLogger(__name__)
FIGURE_DIGITS = 4


@torch.no_grad()
def answer_loss(
    model: nn.Module, rows: list[EncodedCompletion], pad_token_id: int, batch_size: int, progress: bool = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """Token-weighted mean cross-entropy over all answer tokens of `rows`, and its perplexity exp(loss).

    Rows are batched in length order so little compute goes to padding; the result does not depend on it.
    """
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    total_nll = 0.0
    total_tokens = 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        batch = collate([rows[i] for i in order[start : start + batch_size]], pad_token_id)
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


def encode_split_part(
    tokenizer: PreTrainedTokenizerBase, split: Split, part: str, max_length: int
) -> list[EncodedCompletion]:
    dataset = getattr(split, part)
    rows, skipped = encode_all(tokenizer, dataset.examples, max_length)
    if skipped:
        log.warning("%s: %d rows skipped: their prompt alone fills max_length=%d", dataset.name, skipped, max_length)
    if not rows:
        raise DatasetError(f"{dataset.name}: no row fits max_length={max_length}; raise --max-length")
    return rows


def train_completion(config: TrainConfig, base: PreparedBase, split: Split, progress: bool = True) -> TrainResult:
    """Train a completion LoRA on split.train, evaluate on split.validation, write the adapter folder."""
    tokenizer = load_tokenizer(base.path)
    torch.manual_seed(config.seed)  # LoRA A init and dropout
    model = load_causal_lm(base)
    config = config.resolved("completion", default_target_modules(model))
    train_rows = encode_split_part(tokenizer, split, "train", config.max_length)
    val_rows = encode_split_part(tokenizer, split, "validation", config.max_length)
    peft_model = add_lora(model, config, "completion", base.name)
    pad = tokenizer.pad_token_id

    with peft_model.disable_adapter():
        before = answer_loss(peft_model, val_rows, pad, config.eval_batch_size, progress, desc="eval base")

    def loss_fn(m: nn.Module, batch_rows: list[EncodedCompletion]) -> torch.Tensor:
        return m(**collate(batch_rows, pad)).loss  # HF shifts labels and averages over answer tokens

    stats = train_loop(peft_model, shuffled_batches(train_rows, config.batch_size, config.seed), loss_fn, config, progress)
    after = answer_loss(peft_model, val_rows, pad, config.eval_batch_size, progress, desc="eval adapter")
    metrics = {"held_out": held_out_figures(before, after), "train": {**stats.summary(), "rows": len(train_rows)}}
    return write_adapter(config, base, peft_model, "completion", (), metrics, stats)
