"""TrainConfig: validation, environment, defaults resolved per task, manifest round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import CACHE_ENV, DEFAULT_MAX_LENGTH, TrainConfig
from training.errors import ConfigError

REQUIRED = dict(base="smollm2-135m", data="chatterbot:trivia", out=Path("out"))


@pytest.mark.parametrize("field, value", [
    ("method", "sgd"), ("task", "translation"), ("schedule", "step"), ("max_steps", 0), ("batch_size", -1),
    ("lr", 0.0), ("lr", float("nan")), ("lora_r", 2.5), ("lora_dropout", 1.0), ("val_fraction", 1.0),
    ("val_fraction", 0.0), ("warmup_ratio", -0.1), ("seed", -1), ("max_length", 0), ("target_modules", "q_proj,,v"),
    ("base", ""), ("data", ""),
])
def test_bad_values_are_refused_with_the_field_name(field: str, value) -> None:
    with pytest.raises(ConfigError, match=field if field not in ("base", "data") else "must name"):
        TrainConfig(**{**REQUIRED, field: value})


def test_cache_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert TrainConfig(**REQUIRED).cache_dir == tmp_path


def test_target_modules_accept_a_comma_list() -> None:
    config = TrainConfig(**REQUIRED, target_modules="q_proj, v_proj")
    assert config.target_modules == ("q_proj", "v_proj")


def test_resolved_fills_task_defaults_but_keeps_explicit_values() -> None:
    config = TrainConfig(**REQUIRED).resolved("classification", ("query", "value"))
    assert (config.task, config.max_length, config.target_modules) == (
        "classification", DEFAULT_MAX_LENGTH["classification"], ("query", "value"))
    explicit = TrainConfig(**REQUIRED, max_length=32, target_modules="k_proj").resolved("completion", ("q_proj",))
    assert (explicit.max_length, explicit.target_modules) == (32, ("k_proj",))


def test_manifest_round_trip_leaves_machine_paths_out(tmp_path: Path) -> None:
    config = TrainConfig(**REQUIRED, cache_dir=tmp_path, lr=3e-4, target_modules=("q_proj",))
    saved = config.to_manifest()
    assert "cache_dir" not in saved and saved["target_modules"] == ["q_proj"] and saved["out"] == "out"
    rebuilt = TrainConfig.from_manifest({**saved, "unknown_future_field": 1}, cache_dir=tmp_path)
    assert rebuilt == config
