"""Loop pieces: learning-rate schedule, batch order, optimizer groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.config import TrainConfig
from training.loop import build_optimizer, lr_factor, shuffled_batches

STEPS = 100


def _config(**overrides) -> TrainConfig:
    return TrainConfig(base="b", data="d", out=Path("o"), max_steps=STEPS, warmup_ratio=0.1, **overrides)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup_rises_then_decays_towards_zero(schedule: str) -> None:
    factors = [lr_factor(step, _config(schedule=schedule)) for step in range(STEPS)]
    warmup = factors[:10]
    assert warmup == sorted(warmup) and warmup[0] > 0
    assert factors[10] == pytest.approx(1.0)
    assert factors[10:] == sorted(factors[10:], reverse=True)
    assert factors[-1] < 0.05


def test_constant_schedule_after_warmup() -> None:
    assert {lr_factor(step, _config(schedule="constant")) for step in range(10, STEPS)} == {1.0}


def test_each_epoch_visits_every_row_once_in_a_seeded_order() -> None:
    batches = shuffled_batches(list(range(10)), 4, seed=3)
    epoch = [next(batches) for _ in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2]
    assert sorted(sum(epoch, [])) == list(range(10))
    again = shuffled_batches(list(range(10)), 4, seed=3)
    assert [next(again) for _ in range(3)] == epoch


def test_weight_decay_applies_to_matrices_only() -> None:
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(model, _config(weight_decay=0.1))
    decays = {tuple(p.shape): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays == {(2, 4): 0.1, (2,): 0.0}
