"""A handful of steps on the real embedded bases: the folder fits the base the server loads, and
`training eval` rebuilds the same held-out figures from the folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters import read_adapter_folder
from training.config import TrainConfig
from training.evaluate import evaluate_adapter
from training.runner import run_training

pytestmark = pytest.mark.integration
FEW_STEPS = 4


def test_smollm2_completion_few_steps(tmp_path: Path, cache_dir: Path, smollm2_base) -> None:
    config = TrainConfig(
        base="smollm2-135m", data="chatterbot:trivia", out=tmp_path / "trivia", max_steps=FEW_STEPS, batch_size=4,
        lr=2e-3, lora_r=4, target_modules=("q_proj", "v_proj"), eval_rows=12, cache_dir=cache_dir,
    )
    result = run_training(config, progress=False)
    held_out = result.manifest.metrics["held_out"]
    assert held_out["adapter"]["loss"] < held_out["base"]["loss"]
    assert result.manifest.base_fingerprint == smollm2_base.fingerprint
    assert len(read_adapter_folder(result.out).lora) == 2 * 30  # q_proj and v_proj in 30 layers
    assert evaluate_adapter(result.out, cache_dir=cache_dir)["held_out"] == held_out  # also validates vs the base


def test_minilm_classification_few_steps(tmp_path: Path, cache_dir: Path, minilm_base) -> None:
    config = TrainConfig(
        base="minilm-l6", data="rotten-tomatoes", out=tmp_path / "sentiment", max_steps=FEW_STEPS, batch_size=16,
        eval_rows=64, eval_batch_size=64, cache_dir=cache_dir,
    )
    result = run_training(config, progress=False)
    folder = read_adapter_folder(result.out)
    assert folder.labels == ("rotten", "fresh") and folder.extra["classifier.weight"].shape == (2, 384)
    assert result.manifest.train_config["target_modules"] == ["query", "key", "value", "dense"]
    assert result.manifest.metrics["held_out"]["rows"] == 64
    assert evaluate_adapter(result.out, cache_dir=cache_dir)["held_out"] == result.manifest.metrics["held_out"]
