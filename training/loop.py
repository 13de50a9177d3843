"""The optimisation loop shared by every task, readable top to bottom.

One optimizer step = `grad_accum_steps` micro-batches, each loss divided by that count so the summed
gradient is their mean; then the global gradient norm is clipped, AdamW steps, and the learning rate
follows linear warm-up and the configured decay. The task supplies batches and a loss function.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from training.config import TrainConfig
from training.errors import TrainingError
from training.models import trainable_parameters

T = TypeVar("T")
LOSS_WINDOW = 10  # steps averaged for the first / last loss figures (single steps are noisy)


@dataclass(frozen=True)
class LoopStats:
    """What the loop measured; losses are per optimizer step (mean over its micro-batches)."""

    steps: int
    losses: tuple[float, ...]
    seconds: float
    rows_seen: int

    def summary(self) -> dict[str, float | int]:
        window = max(1, min(LOSS_WINDOW, len(self.losses) // 2))
        return {
            "steps": self.steps,
            "rows_seen": self.rows_seen,
            "seconds": round(self.seconds, 2),
            "loss_first": round(sum(self.losses[:window]) / window, 4),
            "loss_last": round(sum(self.losses[-window:]) / window, 4),
        }


def shuffled_batches(items: Sequence[T], batch_size: int, seed: int) -> Iterator[list[T]]:
    """Endless batches: each epoch is a fresh seeded shuffle; a short last batch is kept."""
    rng = random.Random(seed)
    order = list(range(len(items)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [items[i] for i in order[start : start + batch_size]]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier on config.lr at optimizer step `step` (0-based): linear warm-up, then the decay to 0."""
    warmup = int(config.warmup_ratio * config.max_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, config.max_steps - warmup)
    if config.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying biases and norms only pulls them to 0 for nothing."""
    params = trainable_parameters(model)
    decayed = [p for p in params if p.dim() >= 2]
    plain = [p for p in params if p.dim() < 2]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def train_loop(
    model: nn.Module,
    batches: Iterator[list[T]],
    loss_fn: Callable[[nn.Module, list[T]], torch.Tensor],
    config: TrainConfig,
    progress: bool = True,
) -> LoopStats:
    """Run config.max_steps optimizer steps of `loss_fn` over `batches`; the model is left in eval mode."""
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    params = trainable_parameters(model)
    losses: list[float] = []
    rows = 0
    started = time.perf_counter()
    model.train()
    bar = tqdm(range(config.max_steps), desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        step_loss = 0.0
        for _ in range(config.grad_accum_steps):
            batch = next(batches)
            loss = loss_fn(model, batch) / config.grad_accum_steps
            loss.backward()
            step_loss += loss.item()
            rows += len(batch)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(step_loss):
            raise TrainingError(f"training loss became {step_loss} at step {len(losses)}; lower --lr")
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    model.eval()
    return LoopStats(steps=config.max_steps, losses=tuple(losses), seconds=time.perf_counter() - started, rows_seen=rows)
