"""Sequence classification with per-adapter heads on the shared frozen backbone.

Rows of one forward may use different adapters: each row gets its own adapter's LoRA deltas in the
backbone, then its own adapter's head (label sets of any size), so requests for several classifiers
are served by one batched forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.base_model import BaseModel, pooled_features
from server.engine.loaded import LoadedAdapter


@dataclass(frozen=True)
class Classification:
    label: str
    probs: dict[str, float]


@torch.inference_mode()
def classify_rows(base: BaseModel, texts: list[str], adapters: list[LoadedAdapter], max_length: int,
                  tokenizer=None) -> list[Classification]:
    """texts[i] classified with adapters[i] (LoRA weights and head), all in one backbone forward.
    `tokenizer`: a thread's own copy (HF fast tokenizers must not be shared across threads)."""
    tokenizer = tokenizer or base.tokenizer
    for adapter in adapters:
        if adapter.head is None:
            raise ValueError(f"adapter {adapter.name!r} is not a classification adapter")
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    input_ids = batch["input_ids"].to(base.backend.device)
    attention_mask = batch["attention_mask"].to(base.backend.device)
    with base.adapters_for_rows(list(adapters)):
        pooled = pooled_features(base, input_ids, attention_mask)  # [B, hidden]
    results: list[Classification | None] = [None] * len(texts)
    for adapter in {id(a): a for a in adapters}.values():
        rows = [i for i, a in enumerate(adapters) if a is adapter]
        head = adapter.head
        logits = torch.nn.functional.linear(pooled[rows], head.weight, head.bias)  # [n, num_labels]
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        for row, p in zip(rows, probs):
            values = {label: float(v) for label, v in zip(head.labels, p)}
            results[row] = Classification(label=head.labels[int(torch.argmax(p))], probs=values)
    return results


def classify_texts(base: BaseModel, texts: list[str], adapter: LoadedAdapter, max_length: int) -> list[Classification]:
    """All texts with one adapter."""
    return classify_rows(base, texts, [adapter] * len(texts), max_length)
