"""Checkpoints and --resume: an interrupted run continues bit for bit; nothing a failed run touches is lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.loop
from adapters import WEIGHTS_FILE
from adapters.manifest import sha256_file
from training.checkpoints import checkpoint_root, list_checkpoints, save_checkpoint
from training.errors import ConfigError, DatasetError
from training.runner import run_training
from tests.training.conftest import tiny_config

STEPS = 10
STOP_AT = 5


class Interrupted(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


def _config(base: Path, data: Path | str, out: Path, **overrides):
    values = dict(max_steps=STEPS, grad_accum_steps=2, lora_dropout=0.1, eval_every=3, seed=3)
    values.update(overrides)
    return tiny_config(base, data, out, **values)


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, stop_at: int) -> None:
    real = training.loop.save_checkpoint

    def save_then_die(root: Path, step: int, state: dict) -> Path:
        written = real(root, step, state)
        if step == stop_at:
            raise Interrupted
        return written

    monkeypatch.setattr(training.loop, "save_checkpoint", save_then_die)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / WEIGHTS_FILE))


def _folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, qa_jsonl: Path):
    return run_training(_config(tiny_llama_dir, qa_jsonl, tmp_path_factory.mktemp("straight") / "a"), progress=False)


def test_resume_continues_bit_for_bit(
    straight, tmp_path: Path, tiny_llama_dir: Path, qa_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "b"
    _interrupt_after(monkeypatch, STOP_AT)
    with pytest.raises(Interrupted):
        run_training(_config(tiny_llama_dir, qa_jsonl, out, checkpoint_every=STOP_AT), progress=False)
    assert not out.exists() and [p.name for p in list_checkpoints(checkpoint_root(out))] == ["step-00000005"]
    monkeypatch.undo()

    resumed = run_training(_config(tiny_llama_dir, qa_jsonl, out, checkpoint_every=STOP_AT, resume="latest"),
                           progress=False)
    first, second = _weights(straight.out), _weights(out)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert resumed.stats.losses == straight.stats.losses
    assert resumed.stats.validations == straight.stats.validations and resumed.stats.resumed_from_step == STOP_AT
    assert resumed.manifest.metrics["held_out"] == straight.manifest.metrics["held_out"]
    assert resumed.stats.rows_seen == straight.stats.rows_seen
    assert not checkpoint_root(out).exists(), "a finished run drops its checkpoints"


def test_a_fresh_run_refuses_to_start_over_checkpoints(tmp_path: Path, tiny_llama_dir: Path, qa_jsonl: Path) -> None:
    out = tmp_path / "c"
    save_checkpoint(checkpoint_root(out), 4, {"loop": {}})
    with pytest.raises(ConfigError, match="--resume latest"):
        run_training(_config(tiny_llama_dir, qa_jsonl, out, checkpoint_every=2), progress=False)
    assert list_checkpoints(checkpoint_root(out))


def test_resume_with_other_settings_is_refused(
    tmp_path: Path, tiny_llama_dir: Path, qa_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "d"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run_training(_config(tiny_llama_dir, qa_jsonl, out, max_steps=4, checkpoint_every=2), progress=False)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"settings differ \(lr: 0.01 then, 0.02 now\)"):
        run_training(_config(tiny_llama_dir, qa_jsonl, out, max_steps=4, checkpoint_every=2, resume="latest",
                             lr=0.02), progress=False)
    with pytest.raises(ConfigError, match="no checkpoint in"):
        run_training(_config(tiny_llama_dir, qa_jsonl, tmp_path / "none", resume="latest"), progress=False)
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        run_training(_config(tiny_llama_dir, qa_jsonl, out, resume=str(tmp_path)), progress=False)


def test_a_malformed_dataset_loses_no_adapter_and_no_checkpoint(
    straight, tmp_path: Path, tiny_llama_dir: Path, qa_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "e"
    run_training(_config(tiny_llama_dir, qa_jsonl, out, max_steps=2, eval_every=0), progress=False)  # an earlier adapter
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):  # and an interrupted run's checkpoint beside it
        run_training(_config(tiny_llama_dir, qa_jsonl, out, max_steps=4, checkpoint_every=2), progress=False)
    monkeypatch.undo()
    before = {"adapter": _folder_hashes(out), "checkpoints": _folder_hashes(checkpoint_root(out))}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"\n')
    with pytest.raises(DatasetError, match=f"{bad}:2: invalid JSON"):
        run_training(_config(tiny_llama_dir, bad, out, max_steps=4, checkpoint_every=2, resume="latest"), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="no data rows"):
        run_training(_config(tiny_llama_dir, empty, out, max_steps=4, checkpoint_every=2, resume="latest"), progress=False)
    assert {"adapter": _folder_hashes(out), "checkpoints": _folder_hashes(checkpoint_root(out))} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["bad.jsonl", "e", "e.checkpoints", "empty.jsonl"]
