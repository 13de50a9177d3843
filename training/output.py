"""Write a trained adapter folder atomically: the method's files first (training.methods), our manifest, then
the run's report folder (training.report).

The folder is written from CPU tensors (training.device.to_cpu: the trained model leaves the GPU once training is
over), so it holds the same files wherever the run trained. The folder appears at `out` only once complete, report included (adapters.atomic_directory); a failure at any
step leaves nothing new (an earlier folder at `out` stays as it was).
The manifest's `method` says what the folder holds: PEFT files for the PEFT methods, the trained tensors
for freeze, a complete model folder for full.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from adapters import Manifest, PreparedBase, atomic_directory, write_manifest
from training.config import TrainConfig
from training.device import to_cpu
from training.loop import LoopStats
from training.methods import save_trained
from training.report import write_report


@dataclass(frozen=True)
class TrainResult:
    out: Path
    manifest: Manifest
    stats: LoopStats


def write_adapter(
    config: TrainConfig, base: PreparedBase, model: nn.Module, task: str, labels: tuple[str, ...],
    metrics: dict[str, Any], stats: LoopStats,
) -> TrainResult:
    """The method's files (safetensors) + manifest.json (fingerprint, task, method, labels, metrics, train_config)
    + report/ (metrics.json, curves.png). `model` is moved to the CPU first."""
    model = to_cpu(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics = {**metrics, "trainable_parameters": trainable}  # what the optimizer updated, head included
    with atomic_directory(config.out) as tmp:
        save_trained(model, config.method, tmp, base.path)
        manifest = write_manifest(tmp, Manifest(
            task=task, base_name=base.name, base_fingerprint=base.fingerprint, method=config.method,
            labels=labels, metrics=metrics, train_config=config.to_manifest(),
        ))
        write_report(tmp, manifest, stats)  # after the manifest: its figures are the report's
    return TrainResult(out=Path(config.out), manifest=manifest, stats=stats)
