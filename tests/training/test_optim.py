"""TrainConfig.optim: torch's AdamW, bitsandbytes' 8-bit AdamW (CPU and CUDA), its paged variant (CUDA only,
refused elsewhere with the device named), and older manifests and checkpoints without the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.conftest import tiny_config
from training.checkpoints import check_same_run
from training.config import TrainConfig
from training.errors import ConfigError
from training.loop import build_optimizer

bnb = pytest.importorskip("bitsandbytes")

EIGHT_BIT_SIZE = (128, 64)  # 8,192 values: above bitsandbytes' min_8bit_size, so its moments are held in 8 bits
STEPS = 20


def _config(**overrides) -> TrainConfig:
    return TrainConfig(base="b", data="d", out=Path("o"), lr=1e-2, **overrides)


def _fit(device: str, optim: str) -> tuple[torch.optim.Optimizer, float, float]:
    """STEPS steps of a least-squares fit; returns (optimizer, first loss, last loss)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(EIGHT_BIT_SIZE[1], EIGHT_BIT_SIZE[0]).to(device)
    x = torch.randn(32, EIGHT_BIT_SIZE[1], device=device)
    y = torch.randn(32, EIGHT_BIT_SIZE[0], device=device)
    optimizer = build_optimizer(model, _config(optim=optim))
    losses = []
    for _ in range(STEPS):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return optimizer, losses[0], losses[-1]


def test_optim_choices_are_checked() -> None:
    assert _config().optim == "adamw"
    with pytest.raises(ConfigError, match="optim must be one of adamw, adamw_8bit, paged_adamw_8bit"):
        _config(optim="sgd")


def test_manifests_and_checkpoints_from_before_the_field_still_load(tmp_path: Path) -> None:
    saved = _config().to_manifest()
    saved.pop("optim")
    assert TrainConfig.from_manifest(saved).optim == "adamw"
    check_same_run(saved, _config(), tmp_path)  # an older checkpoint resumes: it ran with the default
    with pytest.raises(ConfigError, match="optim"):
        check_same_run(saved, _config(optim="adamw_8bit"), tmp_path)


def test_adamw_8bit_trains_on_cpu_with_8bit_state() -> None:
    optimizer, first, last = _fit("cpu", "adamw_8bit")
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    state = next(s for s in optimizer.state.values() if s["state1"].numel() >= EIGHT_BIT_SIZE[0] * EIGHT_BIT_SIZE[1])
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert last < 0.5 * first


def test_paged_adamw_8bit_is_refused_on_cpu() -> None:
    with pytest.raises(ConfigError, match="paged_adamw_8bit needs a CUDA device; this run trains on cpu"):
        build_optimizer(torch.nn.Linear(4, 2), _config(optim="paged_adamw_8bit"))


def test_a_tiny_run_with_adamw_8bit_records_it(tiny_llama_dir: Path, qa_jsonl: Path, tmp_path: Path) -> None:
    from training.runner import run_training

    config = tiny_config(tiny_llama_dir, qa_jsonl, tmp_path / "adapter", optim="adamw_8bit", max_steps=4)
    result = run_training(config, progress=False)
    assert result.manifest.train_config["optim"] == "adamw_8bit"
    assert result.manifest.metrics["train"]["steps"] == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_train_on_cuda(optim: str) -> None:
    optimizer, first, last = _fit("cuda", optim)
    expected = bnb.optim.PagedAdamW8bit if optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    assert isinstance(optimizer, expected) and last < 0.5 * first
