"""Read an adapter folder (stock PEFT `save_pretrained` output, our manifest optional) into tensors.

PEFT stores `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r];
`modules_to_save` (e.g. a classification head) as `base_model.model.<module>.<param>`. Module names
here are relative to the task model PEFT wrapped (`...ForCausalLM` / `...ForSequenceClassification`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapters.dense import TRAINED_WEIGHTS_FILE, DenseWeights, split_dense_state
from adapters.errors import AdapterFormatError
from adapters.ia3_spec import IA3Scale, IA3Spec, is_ia3_config, parse_ia3_config, split_ia3_state
from adapters.json_file import read_json_object
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


# PEFT's task_type -> the task this project serves the adapter for (anything else: completion).
# FEATURE_EXTRACTION is what PEFT (and sentence-transformers' PEFT support) writes for a bare encoder: an
# adapter for /v1/embeddings.
PEFT_TASKS = {"SEQ_CLS": "classification", "FEATURE_EXTRACTION": "embedding"}


@dataclass(frozen=True)
class AdapterFolder:
    """A parsed, self-consistent adapter (not yet checked against a base: see adapters.validate)."""

    path: Path
    spec: LoraSpec | PromptSpec | IA3Spec | None  # None: a freeze folder (no PEFT config)
    manifest: Manifest | None
    lora: dict[str, LoraWeights]  # module name -> weights (empty for a prompt-learning or IA3 adapter)
    extra: dict[str, torch.Tensor]  # modules_to_save params, e.g. "classifier.weight"
    prompt: PromptWeights | None = None  # prompt tuning / prefix tuning / P-tuning v2 (prompt_spec.py)
    ia3: dict[str, IA3Scale] = field(default_factory=dict)  # module name -> vector (ia3_spec.py)
    dense: dict[str, DenseWeights] = field(default_factory=dict)  # freeze: module name -> its trained weights

    @property
    def task(self) -> str:
        if self.manifest is not None:
            return self.manifest.task
        task_type = self.spec.task_type if self.spec is not None else None
        return PEFT_TASKS.get(task_type, "completion")

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels if self.manifest is not None else ()

    def num_parameters(self) -> int:
        tensors = [t for w in self.lora.values() for t in (w.a, w.b)] + list(self.extra.values())
        tensors += [s.vector for s in self.ia3.values()]
        tensors += [t for w in self.dense.values() for t in (w.weight, w.bias) if t is not None]
        if self.prompt is not None:
            tensors.append(self.prompt.embeddings)
        return sum(t.numel() for t in tensors)


def folder_digest(path: str | Path) -> str:
    """sha256 over the files that make the adapter (config, weights, manifest): a server that drops an
    adapter from memory and re-reads it later checks that it reads the same adapter."""
    folder = Path(path)
    _refuse_unserved_method(folder)
    manifest = read_manifest(folder)
    required = (TRAINED_WEIGHTS_FILE,) if manifest is not None and manifest.method == "freeze" else (CONFIG_FILE, WEIGHTS_FILE)
    digest = hashlib.sha256()
    for name in (*required, MANIFEST_FILE):
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
    if manifest is not None and manifest.method == "freeze":
        return _read_freeze_folder(folder, manifest)
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
    raw_config = read_json_object(config_path)
    prompt_spec = parse_prompt_config(raw_config) if is_prompt_config(raw_config) else None
    ia3_spec = parse_ia3_config(raw_config) if is_ia3_config(raw_config) else None
    spec = prompt_spec or ia3_spec or parse_lora_config(raw_config)
    if manifest is not None:
        check_file_hashes(folder, manifest)
    state = _load_safetensors(folder, WEIGHTS_FILE)  # every tensor checked: floating, finite
    if prompt_spec is not None:
        prompt = read_prompt_weights(state, prompt_spec)
        return AdapterFolder(path=folder, spec=prompt_spec, manifest=manifest, lora={}, extra={}, prompt=prompt)
    if ia3_spec is not None:
        ia3, extra = split_ia3_state(state, PEFT_PREFIX)
        return AdapterFolder(path=folder, spec=ia3_spec, manifest=manifest, lora={}, extra=extra, ia3=ia3)
    lora, extra = _split_state(state, spec)
    if not lora:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no LoRA weights (lora_A / lora_B)")
    return AdapterFolder(path=folder, spec=spec, manifest=manifest, lora=lora, extra=extra)


def _read_freeze_folder(folder: Path, manifest: Manifest) -> AdapterFolder:
    """A `training freeze` folder: its manifest and the trained tensors (dense.py)."""
    check_file_hashes(folder, manifest)
    dense, head = split_dense_state(_load_safetensors(folder, TRAINED_WEIGHTS_FILE))
    return AdapterFolder(path=folder, spec=None, manifest=manifest, lora={}, extra=head, dense=dense)


def _load_safetensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    path = folder / name
    if not path.is_file():
        raise AdapterFormatError(f"{name} is missing in {folder.name!r}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{name} is not a readable safetensors file: {exc}") from exc
    for key, tensor in state.items():
        _check_tensor(key, tensor)
    return state


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
