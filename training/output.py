"""Write a trained adapter folder atomically: PEFT's files first, our manifest last.

The folder appears at `out` only once complete (adapters.atomic_directory); a failure leaves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel

from adapters import Manifest, PreparedBase, atomic_directory, write_manifest
from training.config import TrainConfig
from training.loop import LoopStats

PEFT_MODEL_CARD = "README.md"  # PEFT's generated card: a template that names this machine's base path


@dataclass(frozen=True)
class TrainResult:
    out: Path
    manifest: Manifest
    stats: LoopStats


def write_adapter(
    config: TrainConfig, base: PreparedBase, model: PeftModel, task: str, labels: tuple[str, ...],
    metrics: dict[str, Any], stats: LoopStats,
) -> TrainResult:
    """save_pretrained (safetensors) + manifest.json (fingerprint, task, labels, metrics, train_config)."""
    with atomic_directory(config.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)  # no hub lookup
        (tmp / PEFT_MODEL_CARD).unlink(missing_ok=True)
        manifest = write_manifest(tmp, Manifest(
            task=task, base_name=base.name, base_fingerprint=base.fingerprint, method=config.method,
            labels=labels, metrics=metrics, train_config=config.to_manifest(),
        ))
    return TrainResult(out=Path(config.out), manifest=manifest, stats=stats)
