"""Sequence classification with per-adapter heads on the shared frozen backbone."""

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
def classify_texts(base: BaseModel, texts: list[str], adapter: LoadedAdapter, max_length: int) -> list[Classification]:
    """texts -> one Classification each, using `adapter`'s LoRA weights and head."""
    head = adapter.head
    if head is None:
        raise ValueError(f"adapter {adapter.name!r} is not a classification adapter")
    base.tokenizer.padding_side = "right"
    batch = base.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    input_ids = batch["input_ids"].to(base.backend.device)
    attention_mask = batch["attention_mask"].to(base.backend.device)
    with base.adapters_for_rows([adapter] * len(texts)):
        pooled = pooled_features(base, input_ids, attention_mask)  # [B, hidden]
        logits = torch.nn.functional.linear(pooled, head.weight, head.bias)  # [B, num_labels]
    probs = torch.softmax(logits.float(), dim=-1).cpu()
    results = []
    for row in probs:
        values = {label: float(p) for label, p in zip(head.labels, row)}
        results.append(Classification(label=head.labels[int(torch.argmax(row))], probs=values))
    return results
