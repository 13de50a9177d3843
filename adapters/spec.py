"""Parse PEFT's `adapter_config.json` once into a frozen LoraSpec (scaling computed here, once).

Only what changes the inference math is kept; unsupported features are refused with a message
rather than silently served wrong.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from adapters.errors import AdapterFormatError

SUPPORTED_PEFT_TYPES = ("LORA",)
MAX_RANK = 1024


@dataclass(frozen=True)
class LoraSpec:
    """The inference-relevant part of a PEFT LoRA config."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str  # a list of suffixes, or one regex (PEFT allows both)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] = ()
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def rank_for(self, module_name: str) -> int:
        """Rank of one module, honouring PEFT's `rank_pattern` (key matched as a name suffix)."""
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def scaling_for(self, module_name: str) -> float:
        """`alpha / r` (or `alpha / sqrt(r)` with rsLoRA) for one module."""
        rank = self.rank_for(module_name)
        key = _pattern_key(self.alpha_pattern, module_name)
        alpha = float(self.alpha_pattern[key]) if key is not None else self.lora_alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module_name: str) -> bool:
        """Whether PEFT would have wrapped `module_name` (suffix match for a list, fullmatch for a regex)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)


def _pattern_key(patterns: Mapping[str, Any], module_name: str) -> str | None:
    for key in patterns:
        if module_name == key or module_name.endswith("." + key) or re.fullmatch(f"(.*\\.)?{key}", module_name):
            return key
    return None


def parse_lora_config(raw: Mapping[str, Any]) -> LoraSpec:
    """Validate a decoded `adapter_config.json` and return its LoraSpec, or raise AdapterFormatError."""
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise AdapterFormatError(
            f"peft_type {peft_type!r} is not served yet; supported: {', '.join(SUPPORTED_PEFT_TYPES)}"
        )
    refused = {
        "use_dora": ("DoRA adapters are not served per request; merge one into its base (training export ADAPTER_DIR "
                     "--format merged --out DIR) and serve that as the base (server serve --base DIR)"),
        "layer_replication": "layer_replication is not supported",
        "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    }
    for key, why in refused.items():
        if raw.get(key):
            raise AdapterFormatError(why)
    if raw.get("bias", "none") != "none" or raw.get("lora_bias"):
        raise AdapterFormatError("LoRA adapters that train biases (bias != 'none' or lora_bias) are not supported")
    r = raw.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= MAX_RANK:
        raise AdapterFormatError(f"'r' must be an integer in 1..{MAX_RANK}, got {r!r}")
    alpha = raw.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterFormatError(f"'lora_alpha' must be a positive number, got {alpha!r}")
    targets = raw.get("target_modules")
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        target_modules: tuple[str, ...] | str = tuple(sorted(targets))
    elif isinstance(targets, str) and targets:
        try:
            re.compile(targets)
        except re.error as exc:
            raise AdapterFormatError(f"'target_modules' is not a valid regex: {exc}") from exc
        target_modules = targets
    else:
        raise AdapterFormatError("'target_modules' must be a non-empty list of module names or a regex")
    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(isinstance(v, int) and v > 0 for v in rank_pattern.values()):
        raise AdapterFormatError("'rank_pattern' must map module names to positive integers")
    if not isinstance(alpha_pattern, dict) or not all(isinstance(v, (int, float)) for v in alpha_pattern.values()):
        raise AdapterFormatError("'alpha_pattern' must map module names to numbers")
    modules_to_save = raw.get("modules_to_save") or ()
    return LoraSpec(
        r=r,
        lora_alpha=float(alpha),
        target_modules=target_modules,
        use_rslora=bool(raw.get("use_rslora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        modules_to_save=tuple(modules_to_save),
        task_type=raw.get("task_type"),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(alpha_pattern),
    )
