"""Prompt-learning adapters the server serves per request: PEFT's PROMPT_TUNING and PREFIX_TUNING.

- prompt tuning: `prompt_embeddings` [V, hidden] are V virtual token embeddings put before the prompt's.
- prefix tuning and P-tuning v2 (PEFT's PREFIX_TUNING, with or without its reparameterisation MLP, which
  PEFT runs before saving): `prompt_embeddings` [V, layers * 2 * kv_heads * head_dim] are V key/value
  positions in front of every layer's attention; PEFT lays one row out as (layer, key|value, head, dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from adapters.errors import AdapterFormatError

PROMPT_PEFT_TYPES = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}
PROMPT_TENSOR = "prompt_embeddings"
MAX_VIRTUAL_TOKENS = 1024


@dataclass(frozen=True)
class PromptSpec:
    kind: str  # "prompt" (input embeddings) or "prefix" (every layer's keys and values)
    num_virtual_tokens: int
    num_layers: int
    num_heads: int  # PEFT's num_attention_heads: the key/value heads for prefix tuning
    token_dim: int  # prompt: the hidden size; prefix: kv_heads * head_dim
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    @property
    def width(self) -> int:
        """Columns of `prompt_embeddings`."""
        return self.token_dim if self.kind == "prompt" else self.num_layers * 2 * self.token_dim


@dataclass(frozen=True)
class PromptWeights:
    spec: PromptSpec
    embeddings: torch.Tensor  # [V, spec.width]

    def prefix_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prefix adapters: per layer (keys, values), each [kv_heads, V, head_dim], as PEFT hands them over."""
        spec = self.spec
        head_dim = spec.token_dim // spec.num_heads
        grid = self.embeddings.view(spec.num_virtual_tokens, spec.num_layers, 2, spec.num_heads, head_dim)
        grid = grid.permute(1, 2, 3, 0, 4)  # [layers, 2, heads, V, head_dim]
        return [(grid[layer, 0].contiguous(), grid[layer, 1].contiguous()) for layer in range(spec.num_layers)]


def is_prompt_config(raw: Mapping[str, Any]) -> bool:
    return str(raw.get("peft_type", "")).upper() in PROMPT_PEFT_TYPES


def parse_prompt_config(raw: Mapping[str, Any]) -> PromptSpec:
    """Validate a prompt-learning `adapter_config.json`, or raise AdapterFormatError."""
    kind = PROMPT_PEFT_TYPES[str(raw.get("peft_type")).upper()]
    if raw.get("task_type") not in ("CAUSAL_LM", None):
        raise AdapterFormatError(f"{kind} adapters are served for completion (task_type CAUSAL_LM) only, "
                                 f"got task_type {raw.get('task_type')!r}")
    if int(raw.get("num_transformer_submodules") or 1) != 1:
        raise AdapterFormatError("prompt-learning adapters for encoder-decoder models are not supported")
    values = {}
    for key in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise AdapterFormatError(f"{key!r} must be a positive integer in a {kind} adapter's config, got {value!r}")
        values[key] = value
    if values["num_virtual_tokens"] > MAX_VIRTUAL_TOKENS:
        raise AdapterFormatError(f"num_virtual_tokens must be at most {MAX_VIRTUAL_TOKENS}")
    if kind == "prefix" and values["token_dim"] % values["num_attention_heads"]:
        raise AdapterFormatError("token_dim must be a multiple of num_attention_heads in a prefix adapter's config")
    return PromptSpec(kind=kind, num_virtual_tokens=values["num_virtual_tokens"], num_layers=values["num_layers"],
                      num_heads=values["num_attention_heads"], token_dim=values["token_dim"],
                      task_type=raw.get("task_type"), base_model_name_or_path=raw.get("base_model_name_or_path"))


def read_prompt_weights(state: Mapping[str, torch.Tensor], spec: PromptSpec) -> PromptWeights:
    extra = sorted(set(state) - {PROMPT_TENSOR})
    if extra:
        raise AdapterFormatError(f"a {spec.kind} adapter holds only {PROMPT_TENSOR!r}; found also {extra[:3]}")
    tensor = state.get(PROMPT_TENSOR)
    if tensor is None:
        raise AdapterFormatError(f"{PROMPT_TENSOR!r} is missing from a {spec.kind} adapter")
    expected = (spec.num_virtual_tokens, spec.width)
    if tuple(tensor.shape) != expected:
        raise AdapterFormatError(f"{PROMPT_TENSOR!r} has shape {tuple(tensor.shape)}, its config says {expected}")
    if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
        raise AdapterFormatError(f"{PROMPT_TENSOR!r} must hold finite floating-point values")
    return PromptWeights(spec=spec, embeddings=tensor)
