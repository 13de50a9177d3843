"""Where training computes (training.device): `--device` resolution and its refusals through the CLI, precision
and optimizer choices per device, CPU runs unchanged (the same losses as before devices were a choice), and,
with CUDA (`-m gpu`), tiny LoRA / QLoRA runs on the GPU under bf16 autocast with paged 8-bit AdamW."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training.conftest import tiny_config
from training.cli import USAGE_ERROR, main
from training.config import TrainConfig
from training.device import (CPU, Compute, autocast_dtype, check_optimizer, choose_compute, model_device,
                             resolve_device, to_device)
from training.errors import ConfigError

REQUIRED = dict(base="b", data="d", out=Path("o"))
TINY_FLAGS = ["--max-steps", "2", "--batch-size", "4", "--lora-r", "2", "--val-fraction", "0.25", "--no-progress"]


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without CUDA, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reporting one bf16-capable CUDA device (only the questions resolution asks; nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch)


# -- resolution ---------------------------------------------------------------------------------------------

def test_auto_is_cuda_where_torch_sees_one_else_cpu(no_cuda) -> None:
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU


def test_auto_picks_cuda_when_it_is_there(fake_cuda) -> None:
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_auto_on_this_machine() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cuda_without_cuda_is_refused_with_the_reason(no_cuda) -> None:
    with pytest.raises(ConfigError, match="device cuda: no CUDA device is available on this machine"):
        resolve_device("cuda")


def test_a_cuda_index_past_the_last_device_is_refused(fake_cuda) -> None:
    with pytest.raises(ConfigError, match=r"device cuda:3: this machine has 1 CUDA device\(s\), numbered 0 to 0"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "mps", "CUDA", "cuda:", ""])
def test_device_spellings_are_checked_by_the_config(spec: str) -> None:
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        TrainConfig(**REQUIRED, device=spec)


def test_device_is_machine_local_not_part_of_the_manifest() -> None:
    config = TrainConfig(**REQUIRED, device="cuda:1")  # spelled right: whether it exists is asked at start-up
    saved = config.to_manifest()
    assert "device" not in saved
    assert TrainConfig.from_manifest(saved).device == "auto"  # a folder trained on a GPU evaluates anywhere
    assert TrainConfig.from_manifest(saved, device="cpu").device == "cpu"


# -- precision and optimizer per device ----------------------------------------------------------------------

def test_precision_auto_is_fp32_on_the_cpu() -> None:
    compute = choose_compute(TrainConfig(**REQUIRED, device="cpu"))
    assert compute == Compute(CPU, None) and compute.precision == "fp32"
    assert autocast_dtype("bf16", CPU) is torch.bfloat16  # asked for, it runs as asked


def test_precision_auto_is_bf16_on_cuda_that_has_it(fake_cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    assert autocast_dtype("auto", cuda) is torch.bfloat16 and autocast_dtype("fp32", cuda) is None
    assert choose_compute(TrainConfig(**REQUIRED)).precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert autocast_dtype("auto", cuda) is None
    with pytest.raises(ConfigError, match="does not support bfloat16; use fp32"):
        autocast_dtype("bf16", cuda)


def test_paged_optimizer_is_refused_on_the_cpu_with_what_to_use() -> None:
    with pytest.raises(ConfigError, match="optim paged_adamw_8bit needs a CUDA device; this run trains on cpu.*"
                                          "use --optim adamw_8bit"):
        choose_compute(TrainConfig(**REQUIRED, device="cpu", optim="paged_adamw_8bit"))
    check_optimizer("adamw", CPU)


def test_paged_optimizer_is_accepted_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")  # imported before CUDA is faked: its import probes the real CUDA
    _fake_cuda(monkeypatch)
    assert choose_compute(TrainConfig(**REQUIRED, optim="paged_adamw_8bit")).device.type == "cuda"


def test_batches_on_the_cpu_are_the_same_tensors() -> None:
    ids = torch.ones(2, 3, dtype=torch.long)
    moved = to_device({"input_ids": ids, "note": "kept"}, CPU)
    assert moved["input_ids"] is ids and moved["note"] == "kept"
    assert model_device(torch.nn.Linear(2, 2)) == CPU and model_device(torch.nn.ReLU()) == CPU


# -- through the CLI: one line, exit 2, refused before anything loads ---------------------------------------

def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("flags, expected", [
    (["--device", "cuda"], "device cuda: no CUDA device is available on this machine"),
    (["--device", "cuda:1"], "device cuda:1: no CUDA device is available on this machine"),
    (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cpu", "--optim", "paged_adamw_8bit"], "optim paged_adamw_8bit needs a CUDA device"),
    (["--optim", "paged_adamw_8bit"], "optim paged_adamw_8bit needs a CUDA device"),  # auto: cpu here
])
def test_train_refusals_are_one_line_exit_2_before_anything_loads(
    flags: list[str], expected: str, no_cuda, tmp_path: Path, capsys
) -> None:
    # data and base that do not exist: the device is judged first, so its error is the one printed
    argv = ["lora", "--base", "no-such-base", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "out"),
            *TINY_FLAGS, *flags]
    assert main(argv) == USAGE_ERROR
    lines = _error_lines(capsys)
    assert lines[-1].startswith("training: error: ") and expected in lines[-1], lines
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "out").exists()


def test_eval_refuses_a_missing_cuda_in_one_line(no_cuda, tmp_path: Path, capsys, tiny_bert_dir: Path,
                                                 sentiment_csv: Path) -> None:
    out = tmp_path / "adapter"
    assert main(["lora", "--base", str(tiny_bert_dir), "--data", str(sentiment_csv), "--out", str(out),
                 "--device", "cpu", *TINY_FLAGS]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cuda", "--no-progress"]) == USAGE_ERROR
    lines = _error_lines(capsys)
    assert "training: error: device cuda: no CUDA device" in lines[-1] and not any("Traceback" in x for x in lines)
    assert main(["eval", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["held_out"]["rows"] == 10


def test_device_flag_is_in_the_help_of_train_and_eval(capsys) -> None:
    for command in ("lora", "qlora", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--device DEVICE" in capsys.readouterr().out


def test_a_resume_does_not_compare_devices(tmp_path: Path) -> None:
    from training.checkpoints import check_same_run

    written_on_auto = TrainConfig(**REQUIRED).to_manifest()
    check_same_run(written_on_auto, TrainConfig(**REQUIRED, device="cpu"), tmp_path)
    with pytest.raises(ConfigError, match="precision"):
        check_same_run(written_on_auto, TrainConfig(**REQUIRED, precision="bf16"), tmp_path)


# -- CPU runs are what they were -------------------------------------------------------------------------------

# Per-step losses of 6-step runs (tiny_config, lora_dropout 0.1) recorded before `device` existed, on this
# project's CPU; a CPU run must still give them (the tolerance covers other CPUs' float summation order).
BEFORE_DEVICES = {
    ("llama", "lora"): [10.850494384765625, 10.778016090393066, 10.669116020202637, 10.535628318786621,
                        10.492947578430176, 10.49845027923584],
    ("llama", "qlora"): [10.850977897644043, 10.768746376037598, 10.64185619354248, 10.529001235961914,
                         10.482989311218262, 10.479283332824707],
    ("bert", "lora"): [0.6876959204673767, 0.7039476037025452, 0.7383195757865906, 0.7059274911880493,
                       0.7037166357040405, 0.7036458849906921],
}
BEFORE_DEVICES_HELD_OUT = {("llama", "lora"): 10.4764, ("llama", "qlora"): 10.4693}  # adapter answer loss
LOSS_TOLERANCE = 1e-5


@pytest.mark.parametrize("base, method", list(BEFORE_DEVICES))
def test_a_cpu_run_gives_the_losses_it_gave_before_devices(
    base: str, method: str, tmp_path: Path, tiny_llama_dir: Path, tiny_bert_dir: Path, qa_jsonl: Path,
    sentiment_csv: Path,
) -> None:
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from training.runner import run_training

    base_dir, data = (tiny_llama_dir, qa_jsonl) if base == "llama" else (tiny_bert_dir, sentiment_csv)
    config = tiny_config(base_dir, data, tmp_path / "adapter", method=method, max_steps=6, lora_dropout=0.1,
                         device="cpu")
    result = run_training(config, progress=False)
    assert list(result.stats.losses) == pytest.approx(BEFORE_DEVICES[base, method], abs=LOSS_TOLERANCE)
    if (base, method) in BEFORE_DEVICES_HELD_OUT:
        assert result.manifest.metrics["held_out"]["adapter"]["loss"] == pytest.approx(
            BEFORE_DEVICES_HELD_OUT[base, method], abs=2e-4)
    train = result.manifest.metrics["train"]
    assert "device" not in train and "precision" not in train, "a CPU run reports as before"
    assert "device" not in result.manifest.train_config


# -- on CUDA ---------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_STEPS = 30
EVAL_TOLERANCE = 1e-3  # the same folder evaluated on the CPU: fp32 both, other kernels


def _cuda_run(tmp_path: Path, base_dir: Path, data: Path, method: str, **overrides):
    from training.runner import run_training

    pytest.importorskip("bitsandbytes")
    config = tiny_config(base_dir, data, tmp_path / f"{method}-adapter", method=method, max_steps=GPU_STEPS,
                         device="cuda", optim="paged_adamw_8bit", **overrides)
    return run_training(config, progress=False)


def _check_gpu_run(result) -> None:
    """Trained on cuda in bf16, the loss fell, and the folder is CPU tensors any machine reads."""
    from safetensors.torch import load_file

    from adapters import WEIGHTS_FILE, read_adapter_folder

    train = result.manifest.metrics["train"]
    assert train["device"] == "cuda" and train["precision"] == "bf16"
    assert train["loss_last"] < train["loss_first"]
    assert result.manifest.train_config["optim"] == "paged_adamw_8bit"
    assert "device" not in result.manifest.train_config
    weights = load_file(str(result.out / WEIGHTS_FILE))
    assert weights and all(t.device == CPU and t.dtype == torch.float32 for t in weights.values())
    read_adapter_folder(result.out)  # what the server reads


@pytest.mark.gpu
@needs_cuda
def test_lora_completion_on_cuda_bf16_paged(tmp_path: Path, tiny_llama_dir: Path, qa_jsonl: Path) -> None:
    from training.evaluate import evaluate_adapter

    result = _cuda_run(tmp_path, tiny_llama_dir, qa_jsonl, "lora")
    _check_gpu_run(result)
    held_out = result.manifest.metrics["held_out"]
    assert held_out["adapter"]["loss"] < held_out["base"]["loss"]
    assert evaluate_adapter(result.out, device="cuda")["held_out"] == held_out
    on_cpu = evaluate_adapter(result.out, device="cpu")["held_out"]
    assert on_cpu["adapter"]["loss"] == pytest.approx(held_out["adapter"]["loss"], abs=EVAL_TOLERANCE)


@pytest.mark.gpu
@needs_cuda
def test_qlora_completion_on_cuda_bf16_paged(tmp_path: Path, tiny_llama_dir: Path, qa_jsonl: Path) -> None:
    from training.evaluate import evaluate_adapter

    result = _cuda_run(tmp_path, tiny_llama_dir, qa_jsonl, "qlora")
    _check_gpu_run(result)
    held_out = result.manifest.metrics["held_out"]
    assert held_out["adapter"]["loss"] < held_out["base"]["loss"]
    assert evaluate_adapter(result.out, device="cuda")["held_out"] == held_out  # the same 4-bit base, rebuilt
    on_cpu = evaluate_adapter(result.out, device="cpu")["held_out"]  # quantized by the CPU kernels this time
    assert on_cpu["adapter"]["loss"] < on_cpu["base"]["loss"]


@pytest.mark.gpu
@needs_cuda
def test_qlora_base_is_quantized_onto_the_gpu_with_fp32_master_weights(tiny_llama_dir: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from training.loop import train_loop
    from training.models import default_target_modules, prepare_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)  # on the CPU, as training loads it
    config = tiny_config(tiny_llama_dir, "d", Path("o"), method="qlora", device="cuda", optim="paged_adamw_8bit",
                         max_steps=8).resolved("completion", default_target_modules(model, "qlora"))
    trained = prepare_model(model, config, "completion", "tiny")
    linears = [m for m in trained.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(m.weight.device.type == "cuda" and m.weight.bnb_quantized for m in linears)
    assert all(p.device.type == "cuda" for p in trained.parameters())
    ids = torch.randint(5, 1000, (4, 12), generator=torch.Generator().manual_seed(0))  # [B, S], made on the CPU
    stats = train_loop(trained, [ids[i] for i in range(4)],
                       lambda m, rows: m(**to_device({"input_ids": torch.stack(rows), "labels": torch.stack(rows)},
                                                     model_device(m))).loss,
                       config, progress=False)
    assert stats.precision == "bf16" and stats.device == "cuda" and stats.losses[-1] < stats.losses[0]
    trainable = [p for p in trained.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable), "master weights stay fp32 under autocast"


@pytest.mark.gpu
@needs_cuda
def test_lora_classifier_on_cuda(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path) -> None:
    from training.evaluate import evaluate_adapter

    result = _cuda_run(tmp_path, tiny_bert_dir, sentiment_csv, "lora")
    _check_gpu_run(result)
    assert evaluate_adapter(result.out, device="cuda")["held_out"] == result.manifest.metrics["held_out"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method, options", [
    ("ia3", {}), ("prompt", {"num_virtual_tokens": 4}), ("prefix", {"num_virtual_tokens": 4, "prefix_hidden_size": 16}),
    ("ptuning", {"num_virtual_tokens": 4}), ("freeze", {"freeze_last_k": 1}), ("full", {}),
])
def test_every_other_method_runs_on_cuda(method: str, options: dict, tmp_path: Path, tiny_llama_dir: Path,
                                         qa_jsonl: Path) -> None:
    """The before/after figures (disable_adapter, on the GPU too) and a reload on the GPU for each method."""
    from training.evaluate import evaluate_adapter
    from training.runner import run_training

    config = tiny_config(tiny_llama_dir, qa_jsonl, tmp_path / method, method=method, max_steps=4, device="cuda",
                         **options)
    result = run_training(config, progress=False)
    assert result.manifest.metrics["train"]["device"] == "cuda"
    assert evaluate_adapter(result.out, device="cuda")["held_out"] == result.manifest.metrics["held_out"]

