"""Read an adapter folder (stock PEFT `save_pretrained` output, our manifest optional) into tensors.

PEFT stores `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r];
`modules_to_save` (e.g. a classification head) as `base_model.model.<module>.<param>`. Module names
here are relative to the task model PEFT wrapped (`...ForCausalLM` / `...ForSequenceClassification`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapters.errors import AdapterFormatError
from adapters.manifest import (MANIFEST_FILE, Manifest, check_file_hashes, check_served_method, read_manifest,
                               sha256_file)
from adapters.prompt_spec import PromptSpec, PromptWeights, is_prompt_config, parse_prompt_config, read_prompt_weights
from adapters.spec import LoraSpec, parse_lora_config

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraWeights:
    """One wrapped linear: delta(x) = scaling * (x @ a.T) @ b.T."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class AdapterFolder:
    """A parsed, self-consistent adapter (not yet checked against a base: see adapters.validate)."""

    path: Path
    spec: LoraSpec | PromptSpec
    manifest: Manifest | None
    lora: dict[str, LoraWeights]  # module name -> weights (empty for a prompt-learning adapter)
    extra: dict[str, torch.Tensor]  # modules_to_save params, e.g. "classifier.weight"
    prompt: PromptWeights | None = None  # prompt tuning / prefix tuning / P-tuning v2 (prompt_spec.py)

    @property
    def task(self) -> str:
        if self.manifest is not None:
            return self.manifest.task
        return "classification" if self.spec.task_type == "SEQ_CLS" else "completion"

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels if self.manifest is not None else ()

    def num_parameters(self) -> int:
        tensors = [t for w in self.lora.values() for t in (w.a, w.b)] + list(self.extra.values())
        if self.prompt is not None:
            tensors.append(self.prompt.embeddings)
        return sum(t.numel() for t in tensors)


def folder_digest(path: str | Path) -> str:
    """sha256 over the files that make the adapter (config, weights, manifest): a server that drops an
    adapter from memory and re-reads it later checks that it reads the same adapter."""
    folder = Path(path)
    _refuse_unserved_method(folder)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
        file = folder / name
        if not file.is_file():
            if name == MANIFEST_FILE:
                continue
            raise AdapterFormatError(f"{name} is missing in {folder.name!r}")
        digest.update(f"{name}:{sha256_file(file)};".encode())
    return digest.hexdigest()


def read_adapter_folder(path: str | Path) -> AdapterFolder:
    """Parse and self-check an adapter folder; raise AdapterFormatError with the reason otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFormatError(f"adapter path {str(folder)!r} is not a directory")
    manifest = _refuse_unserved_method(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFormatError(f"{CONFIG_FILE} is missing in {folder.name!r}")
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterFormatError(
                f"refusing pickle weights {pickles}: pickle files can run code when loaded; "
                f"re-save the adapter with safetensors (PEFT: save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterFormatError(f"{WEIGHTS_FILE} is missing in {folder.name!r}")
    try:
        raw_config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(raw_config, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} must hold a JSON object")
    prompt_spec = parse_prompt_config(raw_config) if is_prompt_config(raw_config) else None
    spec = prompt_spec or parse_lora_config(raw_config)
    if manifest is not None:
        check_file_hashes(folder, manifest)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc
    if prompt_spec is not None:
        prompt = read_prompt_weights(state, prompt_spec)
        return AdapterFolder(path=folder, spec=prompt_spec, manifest=manifest, lora={}, extra={}, prompt=prompt)
    lora, extra = _split_state(state, spec)
    if not lora:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no LoRA weights (lora_A / lora_B)")
    return AdapterFolder(path=folder, spec=spec, manifest=manifest, lora=lora, extra=extra)


def _refuse_unserved_method(folder: Path) -> Manifest | None:
    """The folder's manifest; a folder of a method that is not served (IA3, freeze, ...) is refused by that
    method's name here, before a file it does not have is reported missing."""
    manifest = read_manifest(folder)
    if manifest is not None:
        check_served_method(manifest)
    return manifest


def _split_state(state: dict[str, torch.Tensor], spec: LoraSpec) -> tuple[dict[str, LoraWeights], dict[str, torch.Tensor]]:
    a_parts: dict[str, torch.Tensor] = {}
    b_parts: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        _check_tensor(key, tensor)
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if ".lora_embedding_" in name or ".lora_magnitude_vector" in name:
            raise AdapterFormatError(f"tensor {key!r}: LoRA on embeddings and DoRA are not supported")
        if name.endswith(".lora_A.weight"):
            a_parts[name[: -len(".lora_A.weight")]] = tensor
        elif name.endswith(".lora_B.weight"):
            b_parts[name[: -len(".lora_B.weight")]] = tensor
        elif ".lora_" in name:
            raise AdapterFormatError(f"tensor {key!r} is not a LoRA weight this server understands")
        else:
            extra[name] = tensor
    if set(a_parts) != set(b_parts):
        missing = sorted(set(a_parts) ^ set(b_parts))
        raise AdapterFormatError(f"modules with only one of lora_A / lora_B: {missing[:5]}")
    lora = {}
    for module, a in sorted(a_parts.items()):
        b = b_parts[module]
        if spec.fan_in_fan_out:
            raise AdapterFormatError("fan_in_fan_out adapters (GPT-2 Conv1D style) are not supported")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not share a rank"
            )
        expected_rank = spec.rank_for(module)
        if a.shape[0] != expected_rank:
            raise AdapterFormatError(
                f"module {module!r}: weights have rank {a.shape[0]} but {CONFIG_FILE} says r={expected_rank}"
            )
        lora[module] = LoraWeights(a=a, b=b, scaling=spec.scaling_for(module))
    return lora, extra


def _check_tensor(key: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise AdapterFormatError(f"tensor {key!r} has dtype {tensor.dtype}; a floating dtype is required")
    if tensor.dtype == torch.float64:
        raise AdapterFormatError(f"tensor {key!r} is float64; save adapters in float32, float16 or bfloat16")
    if not torch.isfinite(tensor).all():
        raise AdapterFormatError(f"tensor {key!r} contains NaN or Inf")
