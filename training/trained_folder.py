"""Any method's output folder, as `training eval` and `training export` read it: what it holds (method, task,
labels, base), checked, and loaded onto a fresh base through the method table (training.methods).

What each method writes (training.methods): PEFT files (adapter_config.json + adapter_model.safetensors) for
lora, qlora, ia3, prompt, prefix and ptuning; `trained_weights.safetensors` for freeze; a complete HF model
folder for full. Our manifest.json says which, and its file hashes are checked here. A stock PEFT folder
without a manifest is recognised by its peft_type (LoRA, IA3, prompt or prefix tuning).

Checks against the base: a LoRA folder is also parsed by adapters.read_adapter_folder and checked with
adapters.validate_against_base, so a LoRA that does not fit is refused with the server's own words. Other
folders are checked by the base fingerprint their manifest records, then by PEFT / transformers as their
weights load (a shape that does not fit is an AdapterMismatchError naming the folder and the base). DoRA
LoRA folders, which the server does not read, load with PEFT like the other PEFT methods.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters import (AdapterFolder, AdapterFormatError, AdapterMismatchError, BaseSignature, Manifest,
                      PreparedBase, read_adapter_folder, read_manifest, validate_against_base)
from adapters.folder import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE
from adapters.json_file import read_json_object
from adapters.manifest import MANIFEST_FILE, check_file_hashes, sha256_file
from training.config import METHODS
from training.device import CPU
from training.errors import ConfigError, TrainingError
from training.methods import reload_trained
from training.methods.plain import TRAINED_WEIGHTS_FILE, PlainFineTune
from training.models import load_causal_lm, load_sequence_classifier

PEFT_METHODS = ("lora", "qlora", "ia3", "prompt", "prefix", "ptuning")  # folders of PEFT's own files
LORA_METHODS = ("lora", "qlora")
PROMPT_LEARNING_METHODS = ("prompt", "prefix", "ptuning")
FULL_MODEL_CONFIG = "config.json"  # what a `full` folder must hold to load with from_pretrained
STOCK_PEFT_METHODS = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}
HEAD_WEIGHTS = ("classifier.weight", "score.weight")  # a classification head's weight, [num_labels, hidden]
PRETRAIN = "pretrain"  # a pretrain folder is a completion folder whose train_config says it learned raw text


@dataclass(frozen=True)
class TrainedFolder:
    """A checked output folder of one method (not yet checked against a base: `load_trained` does that)."""

    path: Path
    method: str  # one of training.config.METHODS
    task: str  # completion | classification: what the folder's model computes
    manifest: Manifest | None
    peft_config: dict[str, Any]  # adapter_config.json ({} for freeze and full)
    lora: AdapterFolder | None  # the LoRA family's folder as adapters parse it (None for DoRA and other methods)

    @property
    def train_config(self) -> dict[str, Any]:
        return dict(self.manifest.train_config) if self.manifest is not None else {}

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels if self.manifest is not None else ()

    @property
    def training_task(self) -> str:
        """The task it was trained for: `pretrain` for raw text (the folder is a completion folder all the same)."""
        return PRETRAIN if self.task == "completion" and self.train_config.get("task") == PRETRAIN else self.task

    @property
    def rank(self) -> int:
        """The largest LoRA rank (0 for the methods that have none)."""
        if self.lora is not None:
            return max(w.rank for w in self.lora.lora.values())
        return int(self.peft_config.get("r") or 0) if self.method in LORA_METHODS else 0

    def base_ref(self, override: str | None = None) -> str:
        """The base to load: `override` (--base), else the one the manifest names."""
        ref = override or self.train_config.get("base") or (self.manifest.base_name if self.manifest else None)
        if not ref:
            raise ConfigError("this adapter has no manifest naming its base; pass --base")
        return str(ref)

    def digest(self) -> str:
        """sha256 over the files that make the folder, then the manifest: adapters.folder_digest's formula
        (`name:sha256;` for config, weights, manifest) for PEFT folders, every listed file for the others."""
        if self.method in PEFT_METHODS:
            names = [CONFIG_FILE, WEIGHTS_FILE]
        else:
            names = sorted(self.manifest.files) if self.manifest is not None else []
        if (self.path / MANIFEST_FILE).is_file():
            names.append(MANIFEST_FILE)
        digest = hashlib.sha256()
        for name in names:
            digest.update(f"{name}:{sha256_file(self.path / name)};".encode())
        return digest.hexdigest()

    def head_labels(self) -> tuple[str, ...]:
        """LABEL_0.. for each row of a stock PEFT classifier's saved head (no manifest to name them)."""
        if self.method in PEFT_METHODS:
            with safe_open(str(self.path / WEIGHTS_FILE), framework="pt") as weights:
                for key in weights.keys():
                    shape = weights.get_slice(key).get_shape()
                    if key.endswith(HEAD_WEIGHTS) and len(shape) == 2:
                        return tuple(f"LABEL_{i}" for i in range(shape[0]))
        raise ConfigError("this classification folder names no labels and has no head (classifier.weight or "
                          "score.weight) to count them from")


def read_trained_folder(path: str | Path) -> TrainedFolder:
    """Read and self-check the output folder of any method; AdapterFormatError says what is wrong."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFormatError(f"adapter path {str(folder)!r} is not a directory")
    manifest = read_manifest(folder)
    if manifest is not None:
        if manifest.method not in METHODS:
            raise AdapterFormatError(f"{MANIFEST_FILE} names method {manifest.method!r}; known: {', '.join(METHODS)}")
        check_file_hashes(folder, manifest)
    peft_config: dict[str, Any] = {}
    if manifest is None or manifest.method in PEFT_METHODS:
        peft_config = _read_peft_config(folder)
    method = manifest.method if manifest is not None else _stock_method(peft_config)
    _check_method_files(folder, method)
    if manifest is not None:
        task = manifest.task
    else:
        task = "classification" if peft_config.get("task_type") == "SEQ_CLS" else "completion"
    lora = read_adapter_folder(folder) if method in LORA_METHODS and not peft_config.get("use_dora") else None
    return TrainedFolder(folder, method, task, manifest, peft_config, lora)


def load_trained(folder: TrainedFolder, base: PreparedBase, tokenizer: PreTrainedTokenizerBase,
                 labels: tuple[str, ...], reload_as: str | None = None, device: torch.device = CPU) -> nn.Module:
    """A fresh copy of `base` for the folder's task with the folder's training applied, on `device`, in eval
    mode: it computes what the trained model computed, and inside `disable_adapter()` what the base computes.

    `reload_as` reloads the folder as another method's folder (export reloads qlora as lora: the LoRA on the
    full-precision base, which is what a merge folds it into).
    """
    if folder.task == "completion":
        model = load_causal_lm(base)
    else:
        model = load_sequence_classifier(base, labels, tokenizer.pad_token_id)
    _check_against_base(folder, model, base)
    method = reload_as or folder.method
    try:
        trained = reload_trained(model, method, folder.path, device)
    except TrainingError:
        raise
    except (RuntimeError, ValueError, KeyError) as exc:  # PEFT's / torch's words for weights that do not fit
        raise AdapterMismatchError(
            f"{method} folder {folder.path.name!r} does not load onto base {base.name!r}: {exc}") from exc
    return trained


def task_model(model: nn.Module) -> nn.Module:
    """The model that computes what `model` computes and can `generate` / `save_pretrained`: a PEFT model as
    it is, the HF model inside freeze's and full's wrappers."""
    if isinstance(model, PlainFineTune):
        return model.model
    return model


def _read_peft_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{CONFIG_FILE} is missing in {folder.name!r}")
    return read_json_object(path)


def _stock_method(peft_config: dict[str, Any]) -> str:
    """The method of a PEFT folder without our manifest, from its peft_type (prefix and ptuning folders are
    alike once saved; either reloads them)."""
    peft_type = str(peft_config.get("peft_type", "LORA")).upper()
    if peft_type not in STOCK_PEFT_METHODS:
        raise AdapterFormatError(f"peft_type {peft_type!r} is not one this project trains; "
                                 f"known: {', '.join(STOCK_PEFT_METHODS)}")
    return STOCK_PEFT_METHODS[peft_type]


def _check_method_files(folder: Path, method: str) -> None:
    """The file the method's reload reads is there, and is safetensors (pickle files can run code)."""
    if method in PEFT_METHODS:
        required = WEIGHTS_FILE
    elif method == "freeze":
        required = TRAINED_WEIGHTS_FILE
    else:
        required = FULL_MODEL_CONFIG
    if (folder / required).is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterFormatError(f"refusing pickle weights {pickles}: pickle files can run code when loaded; "
                                 "re-save them as safetensors")
    raise AdapterFormatError(f"{required} is missing in {folder.name!r} (a {method} folder)")


def _check_against_base(folder: TrainedFolder, model: PreTrainedModel, base: PreparedBase) -> None:
    if folder.lora is not None:
        validate_against_base(folder.lora, BaseSignature.of(model, base.name, base.fingerprint))
        return
    manifest = folder.manifest
    if manifest is not None and manifest.base_fingerprint and manifest.base_fingerprint != base.fingerprint:
        raise AdapterMismatchError(
            f"adapter was built for base {manifest.base_name!r} (fingerprint {manifest.base_fingerprint}), "
            f"but this base is {base.name!r} (fingerprint {base.fingerprint})"
        )
