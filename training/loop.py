"""The optimisation loop shared by every task, readable top to bottom.

One optimizer step = `grad_accum_steps` micro-batches, each loss divided by that count so the summed
gradient is their mean; then the global gradient norm is clipped, AdamW steps, and the learning rate
follows linear warm-up and the configured decay. The optimizer is torch's AdamW or bitsandbytes' 8-bit
AdamW (paged on CUDA), per `optim`. The task supplies the rows, a loss function and, for
validation during training, an evaluation (`Validation`). The loop computes where the model's trainable
weights are (training.device put them there; the loss function moves its batch to them).

The `# mechanics` of TrainConfig:
- precision: the forward runs under bf16 autocast when asked; weights, gradients and AdamW stay fp32.
- gradient checkpointing: the transformers model recomputes activations in backward (non-reentrant,
  which keeps the RNG state, so dropout masks are the same as without it).
- every `eval_every` steps and at the last one the task's evaluation runs; early stopping counts the
  validations since the watched figure last improved, stops at `early_stopping_patience`, and puts the
  best weights back.
- every `checkpoint_every` steps the whole state is saved (training.checkpoints); a resumed run loads it
  and replays the seeded batch order up to where it stopped, so it continues bit for bit.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from training.checkpoints import check_same_run, checkpoint_root, find_resume_checkpoint, load_checkpoint, save_checkpoint
from training.config import AUTO, TrainConfig
from training.device import autocast_dtype, check_optimizer
from training.errors import ConfigError, TrainingError
from training.models import trainable_parameters

T = TypeVar("T")
LOSS_WINDOW = 10  # steps averaged for the first / last loss figures (single steps are noisy)
LOSS_METRIC = "loss"
CLASSIFICATION_DEFAULT_METRIC = "f1_macro"  # weighs a minority class as much as the majority


@dataclass(frozen=True)
class Validation:
    """The task's held-out evaluation during training.

    `evaluate(model)` returns figures such as {"loss": 0.7, "accuracy": 0.8} (the model is in eval mode and
    no gradient is kept); `metric` names the figure early stopping watches.
    """

    evaluate: Callable[[nn.Module], dict[str, float]]
    metric: str
    higher_is_better: bool


@dataclass(frozen=True)
class LoopStats:
    """What the loop measured; losses are per optimizer step (mean over its micro-batches).

    `validations` are {"step": s, **figures} in step order; `best_step` is the validation whose weights
    the model holds at the end when early stopping is on.
    """

    steps: int
    losses: tuple[float, ...]
    seconds: float
    rows_seen: int
    validations: tuple[dict[str, float], ...] = ()
    best_step: int | None = None
    stopped_early: bool = False
    precision: str = "fp32"
    resumed_from_step: int = 0
    device: str = "cpu"  # the type of the device it trained on: cpu or cuda

    def summary(self) -> dict[str, Any]:
        window = max(1, min(LOSS_WINDOW, len(self.losses) // 2))
        figures: dict[str, Any] = {
            "steps": self.steps,
            "rows_seen": self.rows_seen,
            "seconds": round(self.seconds, 2),
            "loss_first": round(sum(self.losses[:window]) / window, 4),
            "loss_last": round(sum(self.losses[-window:]) / window, 4),
        }
        if self.validations:
            figures.update(validations=len(self.validations), best_step=self.best_step, stopped_early=self.stopped_early)
        if self.precision != "fp32":
            figures["precision"] = self.precision
        if self.device != "cpu":  # CPU runs report as they did before devices were a choice
            figures["device"] = self.device
        if self.resumed_from_step:
            figures["resumed_from_step"] = self.resumed_from_step
        return figures


@dataclass
class LoopState:
    """What the loop carries from step to step; a checkpoint saves it with the weights and the optimizer."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    rows_seen: int = 0
    seconds: float = 0.0
    validations: list[dict[str, float]] = field(default_factory=list)
    best_value: float | None = None
    best_step: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    since_best: int = 0  # validations since the watched figure last improved
    stopped_early: bool = False


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


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (config.optim's) with weight decay on matrices only: decaying biases and norms only pulls them
    to 0 for nothing."""
    params = trainable_parameters(model)
    decayed = [p for p in params if p.dim() >= 2]
    plain = [p for p in params if p.dim() < 2]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    device = params[0].device if params else torch.device("cpu")
    return optimizer_class(config.optim, device)([g for g in groups if g["params"]], lr=config.lr)


def optimizer_class(optim: str, device: torch.device) -> type[torch.optim.Optimizer]:
    """The optimizer class for TrainConfig.optim on `device`, or a ConfigError when it cannot run there
    (training.device.check_optimizer, which the runner already asked at start-up)."""
    check_optimizer(optim, device)
    if optim == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit if optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit


def watched_metric(config: TrainConfig, task: str) -> tuple[str, bool]:
    """(figure early stopping watches, whether higher is better) for `task`."""
    metric = config.early_stopping_metric
    if metric == AUTO:
        metric = CLASSIFICATION_DEFAULT_METRIC if task == "classification" else LOSS_METRIC
    if metric != LOSS_METRIC and task != "classification":
        raise ConfigError(f"early_stopping_metric {metric} needs a classification task; {task} validates on loss")
    return metric, metric != LOSS_METRIC


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation recomputation in the transformers model inside `model` (PEFT wraps it)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if not module.supports_gradient_checkpointing:
                raise ConfigError(f"{type(module).__name__} does not support gradient checkpointing")
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            module.config.use_cache = False  # a KV cache is of no use in training, and transformers warns about it
            return
    raise ConfigError("gradient checkpointing needs a transformers model")


def train_loop(
    model: nn.Module,
    rows: Sequence[T],
    loss_fn: Callable[[nn.Module, list[T]], torch.Tensor],
    config: TrainConfig,
    progress: bool = True,
    validation: Validation | None = None,
    on_step: Callable[[int], None] | None = None,
) -> LoopStats:
    """Run config.max_steps optimizer steps of `loss_fn` over seeded batches of `rows` (fewer if early
    stopping ends it), resuming from config.resume when set; `on_step(step)` is called after each step.
    The model is left in eval mode."""
    weights = {name: p for name, p in model.named_parameters() if p.requires_grad}
    device = next(iter(weights.values())).device
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    amp = autocast_dtype(config.precision, device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    state = LoopState()
    resume_from = find_resume_checkpoint(config)
    if resume_from is not None:
        state = _restore(resume_from, config, weights, optimizer, scheduler)
    resumed_at = state.step
    batches = shuffled_batches(rows, config.batch_size, config.seed)
    for _ in range(state.step * config.grad_accum_steps):  # replay the batch order up to the checkpoint
        next(batches)
    started = time.perf_counter() - state.seconds
    model.train()
    bar = tqdm(total=config.max_steps, initial=state.step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    while state.step < config.max_steps and not state.stopped_early:
        step_loss = 0.0
        for _ in range(config.grad_accum_steps):
            batch = next(batches)
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = loss_fn(model, batch) / config.grad_accum_steps
            loss.backward()
            step_loss += loss.item()
            state.rows_seen += len(batch)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(weights.values()), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(step_loss):
            raise TrainingError(f"training loss became {step_loss} at step {state.step}; lower --lr")
        state.losses.append(step_loss)
        state.step += 1
        postfix = {"loss": f"{step_loss:.3f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}"}
        if validation is not None and config.eval_every and (
                state.step % config.eval_every == 0 or state.step == config.max_steps):
            postfix[validation.metric] = f"{_validate(model, validation, weights, state, config):.4f}"
        if config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.step < config.max_steps \
                and not state.stopped_early:
            state.seconds = time.perf_counter() - started
            save_checkpoint(checkpoint_root(config.out), state.step,
                            _checkpoint(config, weights, optimizer, scheduler, state))
        bar.update(1)
        bar.set_postfix(postfix)
        if on_step is not None:
            on_step(state.step)
    bar.close()
    if config.early_stopping_patience and state.best_weights is not None:
        _load_weights(weights, state.best_weights)
    model.eval()
    return LoopStats(
        steps=state.step, losses=tuple(state.losses), seconds=time.perf_counter() - started, rows_seen=state.rows_seen,
        validations=tuple(state.validations), best_step=state.best_step, stopped_early=state.stopped_early,
        precision="bf16" if amp is not None else "fp32", resumed_from_step=resumed_at, device=device.type,
    )


def _validate(
    model: nn.Module, validation: Validation, weights: dict[str, nn.Parameter], state: LoopState, config: TrainConfig
) -> float:
    """Evaluate, record the figures, keep the best weights, decide on early stopping; returns the watched value."""
    model.eval()
    with torch.no_grad():
        figures = validation.evaluate(model)
    model.train()
    if validation.metric not in figures:
        raise ConfigError(f"validation gives {sorted(figures)}, not {validation.metric!r}")
    state.validations.append({"step": state.step, **figures})
    value = float(figures[validation.metric])
    better = state.best_value is None or (
        value > state.best_value if validation.higher_is_better else value < state.best_value)
    if better:
        state.best_value, state.best_step, state.since_best = value, state.step, 0
        if config.early_stopping_patience:
            state.best_weights = {name: p.detach().clone() for name, p in weights.items()}
    else:
        state.since_best += 1
        state.stopped_early = bool(config.early_stopping_patience) and state.since_best >= config.early_stopping_patience
    return value


def _load_weights(weights: dict[str, nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    if set(saved) != set(weights):
        raise ConfigError("the checkpoint's trainable weights do not match this model's (another method or target?)")
    with torch.no_grad():
        for name, param in weights.items():
            param.copy_(saved[name])


def _checkpoint(
    config: TrainConfig, weights: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, state: LoopState,
) -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return {
        "config": config.to_manifest(), "weights": {name: p.detach().cpu() for name, p in weights.items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng, "loop": dict(vars(state)),
    }


def _restore(
    folder: Path, config: TrainConfig, weights: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> LoopState:
    saved = load_checkpoint(folder)
    check_same_run(saved["config"], config, folder)
    _load_weights(weights, saved["weights"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(saved["rng"]["python"])
    if saved["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return LoopState(**saved["loop"])
