"""Loop pieces: learning-rate schedule, batch order, optimizer groups; the mechanics (bf16 autocast, early
stopping with the best weights kept, gradient checkpointing) on subjects small enough to predict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.config import TrainConfig
from training.errors import ConfigError
from training.loop import (Validation, build_optimizer, enable_gradient_checkpointing, lr_factor, shuffled_batches,
                           train_loop, watched_metric)

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


# -- mechanics: precision, early stopping, gradient checkpointing ------------------------------------------

class _Scalar(torch.nn.Module):
    """One trainable weight pulled towards TARGET: a loop subject whose every step is predictable."""

    TARGET = 3.0

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, 1))

    def loss(self, batch: list[float]) -> torch.Tensor:
        x = torch.tensor(batch).view(-1, 1)
        return ((torch.nn.functional.linear(x, self.weight) - self.TARGET * x) ** 2).mean()


def _loop_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(base="b", data="d", out=tmp_path / "o", max_steps=20, batch_size=2, lr=0.1, warmup_ratio=0.0,
                  schedule="constant", weight_decay=0.0)
    values.update(overrides)
    return TrainConfig(**values)


def test_early_stopping_stops_after_patience_and_keeps_the_best_weights(tmp_path: Path) -> None:
    model = _Scalar()
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 1.0])  # best at the 2nd validation, then 2 without improvement
    seen: dict[int, float] = {}

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        seen[len(seen) + 1] = m.weight.item()
        return {"loss": next(scripted)}

    config = _loop_config(tmp_path, eval_every=2, early_stopping_patience=2)
    stats = train_loop(model, [1.0, 1.0, 1.0], lambda m, b: m.loss(b), config, progress=False,
                       validation=Validation(evaluate, "loss", higher_is_better=False))
    assert stats.stopped_early and stats.steps == 8 and len(stats.validations) == 4
    assert [v["step"] for v in stats.validations] == [2, 4, 6, 8] and stats.best_step == 4
    assert model.weight.item() == seen[2], "the weights of the best validation are put back"
    assert stats.summary()["stopped_early"] is True


def test_higher_is_better_metrics_and_no_early_stop_without_patience(tmp_path: Path) -> None:
    scores = iter([0.5, 0.7, 0.6, 0.6, 0.6])
    config = _loop_config(tmp_path, max_steps=10, eval_every=2)
    model = _Scalar()
    stats = train_loop(model, [1.0], lambda m, b: m.loss(b), config, progress=False,
                       validation=Validation(lambda m: {"accuracy": next(scores)}, "accuracy", higher_is_better=True))
    assert not stats.stopped_early and stats.steps == 10 and stats.best_step == 4
    assert model.weight.item() != 0.0


def test_watched_metric_defaults_and_refusals(tmp_path: Path) -> None:
    config = _loop_config(tmp_path)
    assert watched_metric(config, "classification") == ("f1_macro", True)
    assert watched_metric(config, "completion") == ("loss", False)
    assert watched_metric(_loop_config(tmp_path, early_stopping_metric="accuracy"), "classification") == ("accuracy", True)
    with pytest.raises(ConfigError, match="needs a classification task"):
        watched_metric(_loop_config(tmp_path, early_stopping_metric="accuracy"), "pretrain")


@pytest.mark.parametrize("values, message", [
    (dict(early_stopping_patience=2), "needs eval_every"),
    (dict(precision="fp16"), "precision must be one of"),
    (dict(eval_every=-1), "eval_every must be a non-negative integer"),
    (dict(gradient_checkpointing="maybe"), "gradient_checkpointing must be true or false"),
])
def test_mechanics_fields_are_checked(tmp_path: Path, values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _loop_config(tmp_path, **values)


def test_a_flag_given_as_text_becomes_a_bool(tmp_path: Path) -> None:
    assert _loop_config(tmp_path, gradient_checkpointing="true").gradient_checkpointing is True
    assert _loop_config(tmp_path, gradient_checkpointing="0").gradient_checkpointing is False


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights(tmp_path: Path) -> None:
    dtypes = []

    def loss_fn(m: _Scalar, batch: list[float]) -> torch.Tensor:
        out = torch.nn.functional.linear(torch.tensor(batch).view(-1, 1), m.weight)
        dtypes.append(out.dtype)
        return ((out.float() - 3.0) ** 2).mean()

    model = _Scalar()
    stats = train_loop(model, [1.0], loss_fn, _loop_config(tmp_path, max_steps=3, precision="bf16"), progress=False)
    assert set(dtypes) == {torch.bfloat16} and model.weight.dtype == torch.float32
    assert stats.precision == "bf16" and stats.summary()["precision"] == "bf16"
    fp32 = train_loop(_Scalar(), [1.0], loss_fn, _loop_config(tmp_path, max_steps=1, precision="auto"), progress=False)
    assert fp32.precision == "fp32" and dtypes[-1] == torch.float32, "auto is fp32 on a CPU"


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 2]])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                               LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, init_lora_weights=False))
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.base_model.model.is_gradient_checkpointing
        model.train()
        torch.manual_seed(1)  # the same dropout masks: non-reentrant checkpointing replays the RNG state
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
