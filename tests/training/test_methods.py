"""Every method on the tiny bases, through training.methods directly: a few optimizer steps on one fixed batch
lower the loss, the folder it writes reloads onto a fresh base (PEFT, safetensors or transformers) and gives
the trained model's logits, and disable_adapter() gives the base's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from training.config import METHODS, TrainConfig
from training.methods import default_target_modules, prepare_model, reload_trained, save_trained
from training.methods.plain import TRAINED_WEIGHTS_FILE
from training.methods.qlora import quantize_linears

STEPS = 8
BATCH, SEQ = 4, 12
# A fixed batch is learnable by any method; the rates are large because the run is short.
LR = {"lora": 2e-2, "qlora": 2e-2, "prompt": 1e-1, "prefix": 1e-2, "ptuning": 5e-2, "ia3": 1e-1,
      "freeze": 3e-3, "full": 1e-3}
CLASSIFICATION_LR = {**LR, "prompt": 1e-2}  # a two-label head on top of 0.1-sized prompt steps oscillates
CLASSIFICATION_TOKENS = (7, 900, 33, 500)
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}
PEFT_TYPE = {"lora": "LORA", "qlora": "LORA", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING",
             "ptuning": "PREFIX_TUNING", "ia3": "IA3"}
TOLERANCE = 1e-5
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # BERT's: a noisy loss would flake


def load(task: str, base_dir: Path, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)  # the classification head is fresh: a different seed gives a different head
    if task == "completion":
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return AutoModelForSequenceClassification.from_pretrained(base_dir, dtype=torch.float32, num_labels=2,
                                                              **NO_DROPOUT)


def method_config(method: str, base_dir: Path, out: Path, model: nn.Module, task: str) -> TrainConfig:
    options: dict = {}
    if method in ("prompt", "prefix", "ptuning"):
        options["num_virtual_tokens"] = 4
    if method == "prefix":
        options["prefix_hidden_size"] = 16
    if method == "freeze":
        options["freeze_last_k"] = 1
    # device cpu: these tests feed CPU batches to the prepared model and compare it with CPU references
    config = TrainConfig(base=str(base_dir), data="unused", out=out, method=method, lora_r=4, lora_alpha=8,
                         lora_dropout=0.0, device="cpu", **options)
    return config.resolved(task, default_target_modules(model, method))


def batch(task: str) -> dict[str, torch.Tensor]:
    """Completion: random tokens to memorise. Classification: rows of one repeated token each, labels 0 1 0 1
    (prompt tuning reads BERT's first position, now a virtual token: distinct rows keep it learnable)."""
    if task == "completion":
        ids = torch.randint(5, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))  # [B, S]
        labels = ids
    else:
        ids = torch.tensor(CLASSIFICATION_TOKENS).unsqueeze(1).repeat(1, SEQ)  # [B, S]
        labels = torch.tensor([0, 1, 0, 1])
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: nn.Module, inputs: dict[str, torch.Tensor], lr: float) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(STEPS):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def base_dir_for(task: str, tiny_llama_dir: Path, tiny_bert_dir: Path) -> Path:
    return tiny_llama_dir if task == "completion" else tiny_bert_dir


@pytest.mark.parametrize("task", ["completion", "classification"])
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_saves_and_reloads(method: str, task: str, tmp_path: Path, tiny_llama_dir: Path,
                                         tiny_bert_dir: Path) -> None:
    base_dir = base_dir_for(task, tiny_llama_dir, tiny_bert_dir)
    model = load(task, base_dir, seed=0)
    config = method_config(method, base_dir, tmp_path / "out", model, task)
    trainable = prepare_model(model, config, task, "tiny")
    inputs = batch(task)
    losses = train(trainable, inputs, (LR if task == "completion" else CLASSIFICATION_LR)[method])
    assert losses[-1] < losses[0], losses

    trained_logits = logits(trainable, inputs)
    expected_shape = (BATCH, SEQ, model.config.vocab_size) if task == "completion" else (BATCH, 2)
    assert tuple(trained_logits.shape) == expected_shape  # prompt tuning: the virtual positions are dropped

    folder = tmp_path / "folder"
    folder.mkdir()
    save_trained(trainable, method, folder, base_dir)
    files = {p.name for p in folder.iterdir()}
    if method in PEFT_TYPE:
        assert files == PEFT_FILES
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert saved["peft_type"] == PEFT_TYPE[method] and saved["base_model_name_or_path"] == "tiny"
        if method in ("prefix", "ptuning"):
            assert saved["prefix_projection"] is (method == "prefix")
    elif method == "freeze":
        assert files == {TRAINED_WEIGHTS_FILE}
    else:
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files

    reloaded = reload_trained(load(task, base_dir, seed=1), method, folder)
    torch.testing.assert_close(logits(reloaded, inputs), trained_logits, atol=TOLERANCE, rtol=0)

    if task == "completion":  # sft's "before" figures: the base's own output, whatever the method
        fresh = load(task, base_dir, seed=0)
        if method == "qlora":
            quantize_linears(fresh)
        with trainable.disable_adapter():
            torch.testing.assert_close(logits(trainable, inputs), logits(fresh, inputs), atol=TOLERANCE, rtol=0)
        with reloaded.disable_adapter():  # a reloaded folder too (`training eval`'s "before" figures)
            torch.testing.assert_close(logits(reloaded, inputs), logits(fresh, inputs), atol=TOLERANCE, rtol=0)
        assert not torch.allclose(logits(trainable, inputs), logits(fresh, inputs), atol=TOLERANCE)


def test_freeze_changes_only_the_last_mlps_and_the_head(tmp_path: Path, tiny_bert_dir: Path) -> None:
    model = load("classification", tiny_bert_dir, seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = method_config("freeze", tiny_bert_dir, tmp_path / "out", model, "classification")
    train(prepare_model(model, config, "classification", "tiny"), batch("classification"), LR["freeze"])
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    last = "bert.encoder.layer.1."
    assert changed and all(n.startswith((last + "intermediate.", last + "output.", "classifier.")) for n in changed)
    assert any(n.startswith(last + "intermediate.") for n in changed) and "classifier.weight" in changed
    assert not any("LayerNorm" in n for n in changed)  # the MLPs' linear layers: what the server can serve


def test_freeze_named_modules(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model = load("completion", tiny_llama_dir, seed=0)
    config = TrainConfig(base="b", data="d", out=tmp_path, method="freeze", trainable_modules="layers.0.mlp.down_proj")
    trainable = prepare_model(model, config, "completion", "tiny")
    assert trainable.trainable_names == ("model.layers.0.mlp.down_proj.weight",)


def test_lora_switches_reach_peft(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model = load("completion", tiny_llama_dir, seed=0)
    config = method_config("lora", tiny_llama_dir, tmp_path, model, "completion")
    config = dataclasses.replace(config, use_rslora=True, use_dora=True)
    peft_config = prepare_model(model, config, "completion", "tiny").peft_config["default"]
    assert peft_config.use_rslora and peft_config.use_dora


def test_unknown_target_modules_are_refused(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from training.errors import ConfigError

    for method in ("lora", "ia3"):
        model = load("classification", tiny_bert_dir, seed=0)
        config = TrainConfig(base="b", data="d", out=tmp_path, method=method, target_modules="q_proj")
        with pytest.raises(ConfigError, match=r"target modules \['q_proj'\] are not linear layers of 'tiny'"):
            prepare_model(model, config, "classification", "tiny")
    model = load("classification", tiny_bert_dir, seed=0)
    config = TrainConfig(base="b", data="d", out=tmp_path, method="freeze", trainable_modules="nope")
    with pytest.raises(ConfigError, match="trainable module 'nope' is not a module of this base"):
        prepare_model(model, config, "classification", "tiny")
    config = TrainConfig(base="b", data="d", out=tmp_path, method="freeze", freeze_last_k=9)
    with pytest.raises(ConfigError, match="freeze_last_k=9 but this base has 2 blocks"):
        prepare_model(model, config, "classification", "tiny")
