"""LoRA training step time, side by side in ONE run: our loop (training.loop.train_loop) vs a plain PEFT +
transformers `Trainer` loop, on the same model, data, batches, max length, steps and seed.

Both systems train the same PEFT LoRA model (what `training lora` builds: LoraConfig + get_peft_model on the
base with a fresh head, seeded alike) on the same rows in the same order: our seeded batch order is drawn
first and handed to the Trainer in that order (a sequential sampler), so every step sees identical tensors.
Our step tokenizes its batch inside the step (that is how our loop runs); the Trainer gets the rows tokenized
beforehand and pads them with DataCollatorWithPadding, as a plain Trainer script would. Same optimizer
settings (AdamW, weight decay, warm-up + cosine, clipping at 1.0), fp32, no progress bars, no saving.

This machine is shared and noisy, so the two systems alternate over `--rounds` rounds (which goes first
alternates too), each round on a freshly built model, after a short warm-up round of each that is not
counted (the first run in a process pays for loading kernels and caches); a step's time is the gap between consecutive step
ends (the first step of each run, which pays for one-time allocations, is left out), and each system's
figure is the median over all its steps. The last line printed is JSON.

    python benchmarks/bench_training_speed.py                       # minilm-l6, rotten-tomatoes (~3 min)
    python benchmarks/bench_training_speed.py --steps 10 --rounds 2 # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import SequentialSampler
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from adapters import resolve_base
from training.classify import classification_loss
from training.config import TrainConfig
from training.data import ClassificationExample, load_dataset, split_dataset
from training.loop import shuffled_batches, train_loop
from training.models import default_target_modules, load_sequence_classifier, load_tokenizer

FIRST_STEPS_SKIPPED = 1  # the first step of a run pays for allocations and lazy initialisation


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="minilm-l6")
    p.add_argument("--data", default="rotten-tomatoes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--rounds", type=int, default=3, help="runs of each system, alternating")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps of the uncounted warm-up run of each system")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="where prepared bases are cached")
    return p.parse_args()


class Rows(TorchDataset):
    """Pre-tokenized rows for the Trainer, in our batch order."""

    def __init__(self, features: list[dict[str, Any]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


class InOrderTrainer(Trainer):
    """A stock Trainer whose sampler keeps the dataset's order (ours), so both systems see the same batches."""

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
        return SequentialSampler(self.train_dataset)


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers' callback signature
        self.ends.append(time.perf_counter())


def build_model(base, labels: tuple[str, ...], pad_token_id: int, config: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(config.seed)  # head and LoRA init, as train_classifier seeds them
    model = load_sequence_classifier(base, labels, pad_token_id)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(default_target_modules(model)), bias="none", task_type=TaskType.SEQ_CLS)
    return get_peft_model(model, lora)


def step_times(ends: list[float]) -> list[float]:
    return [b - a for a, b in zip(ends[FIRST_STEPS_SKIPPED - 1:], ends[FIRST_STEPS_SKIPPED:])]


def run_ours(base, labels, tokenizer, rows, config) -> tuple[list[float], float]:
    model = build_model(base, labels, tokenizer.pad_token_id, config)
    ends: list[float] = []
    stats = train_loop(model, rows, classification_loss(tokenizer, config.max_length), config, progress=False,
                       on_step=lambda step: ends.append(time.perf_counter()))
    return step_times(ends), statistics.mean(stats.losses)


def run_trainer(base, labels, tokenizer, ordered: list[ClassificationExample], config) -> tuple[list[float], float]:
    model = build_model(base, labels, tokenizer.pad_token_id, config)
    features = [{**tokenizer(e.text, truncation=True, max_length=config.max_length), "labels": e.label} for e in ordered]
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=config.batch_size, max_steps=config.max_steps,
            learning_rate=config.lr, weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio,
            lr_scheduler_type="cosine", max_grad_norm=config.max_grad_norm, seed=config.seed, report_to=[],
            save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, use_cpu=True, optim="adamw_torch",
        )
        trainer = InOrderTrainer(model=model, args=args, train_dataset=Rows(features),
                                 data_collator=DataCollatorWithPadding(tokenizer), callbacks=[clock])
        mean_loss = trainer.train().training_loss
    return step_times(clock.ends), mean_loss


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    extra = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    config = TrainConfig(base=args.base, data=args.data, out="unused", task="classification", max_steps=args.steps,
                         batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, **extra)
    base = resolve_base(config.base, config.cache_dir)
    split = split_dataset(load_dataset(config.data, "classification"), config.val_fraction, config.split_seed,
                          config.eval_rows)
    labels = split.train.labels
    tokenizer = load_tokenizer(base.path)
    rows: list[ClassificationExample] = list(split.train.examples)  # type: ignore[arg-type]
    batches = shuffled_batches(rows, config.batch_size, config.seed)
    ordered = [row for _ in range(config.max_steps) for row in next(batches)]  # our order, for the Trainer

    warmup = dataclasses.replace(config, max_steps=args.warmup_steps)
    run_ours(base, labels, tokenizer, rows, warmup)
    run_trainer(base, labels, tokenizer, ordered, warmup)

    times: dict[str, list[float]] = {"ours": [], "trainer": []}
    mean_loss: dict[str, float] = {}  # a sanity check: same data and settings, so similar losses
    for round_no in range(args.rounds):
        order = ("ours", "trainer") if round_no % 2 == 0 else ("trainer", "ours")
        for system in order:
            if system == "ours":
                step_s, mean_loss[system] = run_ours(base, labels, tokenizer, rows, config)
            else:
                step_s, mean_loss[system] = run_trainer(base, labels, tokenizer, ordered, config)
            times[system] += step_s
            print(f"round {round_no + 1}/{args.rounds} {system:8s} median {statistics.median(step_s):.3f} s/step",
                  flush=True)

    ours, trainer = (statistics.median(times[s]) for s in ("ours", "trainer"))
    summary = {
        "bench": "training_speed", "base": base.name, "data": config.data, "batch_size": config.batch_size,
        "max_length": config.max_length, "steps": config.max_steps, "rounds": args.rounds, "threads": args.threads,
        "ours_s_per_step": round(ours, 4), "trainer_s_per_step": round(trainer, 4),
        "ours_mean_s_per_step": round(statistics.mean(times["ours"]), 4),
        "trainer_mean_s_per_step": round(statistics.mean(times["trainer"]), 4),
        "ratio_ours_over_trainer": round(ours / trainer, 3),
        "mean_train_loss": {s: round(v, 4) for s, v in mean_loss.items()},
    }
    print(f"ours {ours:.3f} s/step, Trainer {trainer:.3f} s/step, ours/Trainer = {ours / trainer:.3f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
