"""Every method end to end (`training METHOD` on the tiny BERT): the folder's manifest names the method, the
server's reader serves LoRA and QLoRA folders (prompt-learning ones for completion only) and refuses the others by name, with a 400 from add-adapter;
the method options' validation and their CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapters import AdapterFormatError, read_adapter_folder
from adapters.manifest import COMPLETION_ONLY_METHODS, SERVED_METHODS
from training.cli import USAGE_ERROR, main
from training.config import METHODS, TrainConfig
from training.errors import ConfigError
from training.output import TrainResult
from training.runner import run_training
from tests.training.conftest import tiny_config

STEPS = 3
METHOD_OPTIONS = {"prompt": {"num_virtual_tokens": 4}, "prefix": {"num_virtual_tokens": 4, "prefix_hidden_size": 16},
                  "ptuning": {"num_virtual_tokens": 4}, "freeze": {"freeze_last_k": 1}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, sentiment_csv: Path) -> dict[str, TrainResult]:
    root = tmp_path_factory.mktemp("method-runs")
    return {
        method: run_training(tiny_config(tiny_bert_dir, sentiment_csv, root / method, method=method, max_steps=STEPS,
                                         **METHOD_OPTIONS.get(method, {})), progress=False)
        for method in METHODS
    }


@pytest.mark.parametrize("method", METHODS)
def test_manifest_names_the_method_and_its_figures(method: str, runs: dict[str, TrainResult]) -> None:
    manifest = runs[method].manifest
    assert manifest.method == method and manifest.train_config["method"] == method
    assert manifest.task == "classification" and manifest.labels == ("neg", "pos")
    assert manifest.metrics["trainable_parameters"] > 0
    assert {"accuracy", "f1_macro"} <= set(manifest.metrics["held_out"])


def test_trainable_parameter_counts_follow_the_method(runs: dict[str, TrainResult]) -> None:
    count = {method: run.manifest.metrics["trainable_parameters"] for method, run in runs.items()}
    assert count["full"] > count["freeze"] > count["lora"] > count["ia3"]
    assert count["prefix"] > count["ptuning"]  # the reparameterisation MLP trains too (only its output is saved)
    assert count["lora"] == count["qlora"]


@pytest.mark.parametrize("method", METHODS)
def test_the_server_reader_serves_lora_folders_and_refuses_the_rest(method: str, runs: dict[str, TrainResult]) -> None:
    if method in SERVED_METHODS and method not in COMPLETION_ONLY_METHODS:
        assert read_adapter_folder(runs[method].out).manifest.method == method
        return
    with pytest.raises(AdapterFormatError) as refused:
        read_adapter_folder(runs[method].out)
    if method in COMPLETION_ONLY_METHODS:  # served per request for completion; these runs are classifiers
        assert str(refused.value) == (f"method {method!r} adapters are served for completion only; "
                                      "this one is for classification")
    else:
        assert str(refused.value) == (f"method {method!r} adapters are not served yet; served methods: "
                                      "lora, qlora, prompt, prefix, ptuning")


def test_add_adapter_answers_400_for_a_method_it_does_not_serve(
    tmp_path: Path, tiny_bert_dir: Path, runs: dict[str, TrainResult]
) -> None:
    from adapters.fingerprint import fingerprint_base_folder
    from adapters import PreparedBase
    from server.api.app import create_app
    from server.config import ServerConfig
    from server.engine.base_model import load_base
    from tests.server.conftest import ADMIN, CPU_FP32

    base = load_base(PreparedBase(tiny_bert_dir.name, tiny_bert_dir, fingerprint_base_folder(tiny_bert_dir)), CPU_FP32)
    config = ServerConfig(base=str(tiny_bert_dir), served_name="tiny-bert", state_dir=tmp_path / "state",
                          admin_token="test-token")
    with TestClient(create_app(config, base=base)) as client:
        for method in ("ia3", "freeze", "full"):
            answer = client.post("/v1/load_lora_adapter", headers=ADMIN,
                                 json={"lora_name": method, "lora_path": str(runs[method].out)})
            assert answer.status_code == 400, answer.text
            assert f"method {method!r} adapters are not served yet" in answer.text
        served = client.post("/v1/load_lora_adapter", headers=ADMIN,
                             json={"lora_name": "q", "lora_path": str(runs["qlora"].out)})
        assert served.status_code == 200, served.text
        classified = client.post("/v1/classify", json={"model": "q", "input": "great film, loved it"})
        assert classified.status_code == 200 and classified.json()["data"][0]["label"] in ("neg", "pos")


@pytest.mark.parametrize("overrides, message", [
    ({"method": "prompt", "use_dora": True}, "use_dora applies to method lora or qlora, not 'prompt'"),
    ({"method": "lora", "num_virtual_tokens": 5}, "num_virtual_tokens applies to method prompt or prefix or ptuning"),
    ({"method": "ptuning", "prefix_hidden_size": 8}, "prefix_hidden_size applies to method prefix, not 'ptuning'"),
    ({"method": "full", "freeze_last_k": 1}, "freeze_last_k applies to method freeze, not 'full'"),
    ({"method": "freeze", "freeze_last_k": 1, "trainable_modules": "mlp"}, "not both"),
    ({"method": "freeze", "freeze_last_k": 0}, "freeze_last_k must be a positive integer"),
    ({"method": "prompt", "num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
    ({"method": "qlora", "qlora_quant_type": "int3"}, "qlora_quant_type must be one of nf4, fp4"),
    ({"method": "lora", "use_rslora": "maybe"}, "use_rslora must be true or false"),
    ({"method": "freeze", "trainable_modules": "a,,b"}, "trainable_modules must be non-empty module names"),
])
def test_method_options_are_checked(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(base="b", data="d", out=Path("o"), **overrides)


def test_method_options_survive_the_manifest() -> None:
    config = TrainConfig(base="b", data="d", out=Path("o"), method="freeze", trainable_modules="layers.1.mlp,classifier")
    saved = json.loads(json.dumps(config.to_manifest()))
    assert TrainConfig.from_manifest(saved) == config


def test_cli_trains_a_method_with_its_flags(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path, capsys) -> None:
    out = tmp_path / "ptuning"
    args = ["ptuning", "--base", str(tiny_bert_dir), "--data", str(sentiment_csv), "--out", str(out),
            "--num-virtual-tokens", "3", "--max-steps", "2", "--batch-size", "4", "--val-fraction", "0.25", "--no-progress"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and printed["metrics"]["trainable_parameters"] > 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["num_virtual_tokens"] == 3 and not saved["prefix_projection"]

    rslora = tmp_path / "rslora"
    args = ["lora", "--base", str(tiny_bert_dir), "--data", str(sentiment_csv), "--out", str(rslora), "--use-rslora",
            "--max-steps", "1", "--batch-size", "4", "--lora-r", "2", "--val-fraction", "0.25", "--no-progress"]
    assert main(args) == 0
    assert json.loads((rslora / "adapter_config.json").read_text())["use_rslora"] is True


def test_cli_refuses_an_option_of_another_method(tmp_path: Path, capsys) -> None:
    assert main(["prompt", "--base", "b", "--data", "d", "--out", str(tmp_path), "--use-dora"]) == USAGE_ERROR
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "training: error: use_dora applies to method lora or qlora, not 'prompt'")
