"""TrainConfig: the one configuration object of the training side.

Every field carries its help text (the CLI builds its flags from them) and is checked in
`__post_init__`. This is the only module of `training/` that reads `os.environ` (LORAPLEX_CACHE, for
where prepared bases live). The config is saved into every adapter's manifest (`to_manifest`), so
`training eval` can rebuild the exact held-out split and tokenization from the adapter folder alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from training.errors import ConfigError

METHODS = ("lora", "qlora", "prompt", "prefix", "ptuning", "ia3", "freeze", "full")
TASKS = ("completion", "classification", "pretrain")  # pretrain: continued pre-training on raw text
AUTO = "auto"
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = (AUTO, "fp32", "bf16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")  # whether it exists here is training.device's to check
WATCHED_METRICS = (AUTO, "loss", "accuracy", "f1_macro")
RESUME_LATEST = "latest"
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
CACHE_ENV = "LORAPLEX_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "loraplex"
QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes 4-bit formats for qlora
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")  # torch's AdamW; bitsandbytes' 8-bit ones (training.loop)
DEFAULT_FREEZE_LAST_K = 2
# Which methods read each `# method options` field: setting one for another method is refused, not ignored.
METHOD_OPTION_USERS = {
    "use_rslora": ("lora", "qlora"), "use_dora": ("lora", "qlora"), "qlora_quant_type": ("qlora",),
    "num_virtual_tokens": ("prompt", "prefix", "ptuning"), "prefix_hidden_size": ("prefix",),
    "freeze_last_k": ("freeze",), "trainable_modules": ("freeze",),
}
# Per-task defaults used where a field is left unset (None): chat turns are longer than review snippets.
DEFAULT_MAX_LENGTH = {"completion": 256, "classification": 64, "pretrain": 128}
# Left out of the manifest: they describe this machine, not the run (an adapter trained on a GPU evaluates on a
# CPU; the device a run used is in its metrics, metrics.train.device).
MACHINE_LOCAL_FIELDS = ("cache_dir", "device")


def default_cache_dir() -> Path:
    """$LORAPLEX_CACHE, else ~/.cache/loraplex: where prepared bases live (read here and nowhere else)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    """What one training run needs; defaults suit a short LoRA run on a 2-core CPU."""

    base: str = field(metadata=_help("base model: an embedded name (smollm2-135m, minilm-l6), a local HF folder or a .gguf"))
    data: str = field(metadata=_help("bundled data set (rotten-tomatoes, tweets, debates, chatterbot[:TOPIC]) or a CSV/JSONL path"))
    out: Path = field(metadata=_help("adapter folder to write (replaced atomically)"))
    method: str = field(default="lora", metadata=_help(f"fine-tuning method, one of {', '.join(METHODS)}"))
    task: str = field(default=AUTO, metadata=_help(
        "completion or classification; auto picks completion for causal LMs, classification for encoders"))
    max_steps: int = field(default=100, metadata=_help("optimizer steps"))
    batch_size: int = field(default=8, metadata=_help("rows per micro-batch"))
    grad_accum_steps: int = field(default=1, metadata=_help("micro-batches summed into each optimizer step"))
    lr: float = field(default=1e-3, metadata=_help("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay on matrices (not biases)"))
    warmup_ratio: float = field(default=0.1, metadata=_help("fraction of max_steps spent warming the learning rate up from 0"))
    schedule: str = field(default="cosine", metadata=_help(f"learning-rate decay after warm-up: {', '.join(SCHEDULES)}"))
    max_grad_norm: float = field(default=1.0, metadata=_help("clip the gradient's global L2 norm to this (0 turns clipping off)"))
    lora_r: int = field(default=8, metadata=_help("LoRA rank"))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA alpha (the update is scaled by alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=_help("dropout on the LoRA input during training"))
    target_modules: tuple[str, ...] = field(default=(), metadata=_help(
        "comma-separated module names to wrap; empty = q_proj,k_proj,v_proj,o_proj (decoders) "
        "or query,key,value,dense (BERT encoders)"))
    max_length: int | None = field(default=None, metadata=_help(
        "tokens per row, longer rows are cut on the right; default 256 for completion, 64 for classification"))
    seed: int = field(default=0, metadata=_help("seed for the LoRA / head initialisation, dropout and batch order"))
    split_seed: int = field(default=0, metadata=_help(
        "seed of the train/validation split (kept apart from --seed so runs with different seeds share one held-out set)"))
    val_fraction: float = field(default=0.1, metadata=_help("fraction of the rows held out for evaluation"))
    eval_rows: int = field(default=512, metadata=_help("at most this many held-out rows"))
    eval_batch_size: int = field(default=16, metadata=_help("rows per evaluation batch"))
    cache_dir: Path = field(default_factory=default_cache_dir, metadata=_help(
        f"where prepared bases are cached (default ${CACHE_ENV} or {DEFAULT_CACHE})"))

    # mechanics: device, precision, memory, validation during training, early stopping, checkpoints and resume
    device: str = field(default=AUTO, metadata=_help(
        "where the model trains: cpu, cuda, cuda:N or auto (cuda when torch sees a CUDA device, else cpu)"))
    precision: str = field(default=AUTO, metadata=_help(
        "fp32, bf16 (autocast: bf16 matmuls over fp32 weights and optimizer state) or auto "
        "(bf16 on a CUDA device that supports it, else fp32)"))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "recompute activations during the backward pass: less memory for about a third more compute"))
    eval_every: int = field(default=0, metadata=_help(
        "validate every N optimizer steps and at the last one, for the validation curve (0: off)"))
    early_stopping_patience: int = field(default=0, metadata=_help(
        "stop after N validations without improvement and keep the best weights (0: off; needs --eval-every)"))
    early_stopping_metric: str = field(default=AUTO, metadata=_help(
        "validation figure early stopping watches: loss, accuracy or f1_macro; auto: loss for completion "
        "and pretrain, f1_macro for classification"))
    checkpoint_every: int = field(default=0, metadata=_help(
        "write a resumable checkpoint (weights, optimizer, schedule, RNG) every N steps into OUT.checkpoints/ (0: off)"))
    resume: str = field(default="", metadata=_help(
        f"continue an interrupted run: {RESUME_LATEST!r} (newest checkpoint in OUT.checkpoints/) or a checkpoint folder"))
    optim: str = field(default="adamw", metadata=_help(
        "optimizer: adamw (torch); adamw_8bit (bitsandbytes: AdamW with 8-bit moment estimates, CPU or CUDA); "
        "paged_adamw_8bit (the same, its state paged out of GPU memory under pressure: CUDA only)"))

    # method options: read by training/methods/ (which method reads which: METHOD_OPTION_USERS)
    use_rslora: bool = field(default=False, metadata=_help(
        "lora/qlora: rank-stabilised LoRA, the update scaled by alpha / sqrt(r) instead of alpha / r (served)"))
    use_dora: bool = field(default=False, metadata=_help(
        "lora/qlora: weight-decomposed LoRA (DoRA: a trained magnitude per output); the server refuses DoRA "
        "folders, `training export` merges them into a merged or ONNX model"))
    qlora_quant_type: str = field(default="nf4", metadata=_help(
        f"qlora: 4-bit format of the frozen base's linear layers (bitsandbytes), one of {', '.join(QUANT_TYPES)}"))
    num_virtual_tokens: int = field(default=20, metadata=_help(
        "prompt: trained embeddings prepended to the input; prefix/ptuning: trained key/value positions on every layer"))
    prefix_hidden_size: int | None = field(default=None, metadata=_help(
        "prefix: hidden size of the reparameterisation MLP that produces the prefixes (default: the base's hidden size)"))
    freeze_last_k: int | None = field(default=None, metadata=_help(
        f"freeze: train the MLPs of the last k transformer blocks (default {DEFAULT_FREEZE_LAST_K} "
        "unless --trainable-modules is given)"))
    trainable_modules: tuple[str, ...] = field(default=(), metadata=_help(
        "freeze: comma-separated module names (full or a dotted suffix, e.g. layers.29.mlp) to train instead "
        "of the last k MLPs; a classification head always trains"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())
        object.__setattr__(self, "target_modules", _as_names(self.target_modules))
        _check_choice("method", self.method, METHODS)
        _check_choice("task", self.task, (AUTO, *TASKS))
        _check_choice("schedule", self.schedule, SCHEDULES)
        if not self.base:
            raise ConfigError("base must name a model")
        if not self.data:
            raise ConfigError("data must name a bundled data set or a file")
        for name in ("max_steps", "batch_size", "grad_accum_steps", "lora_r", "eval_rows", "eval_batch_size"):
            _check_positive_int(name, getattr(self, name))
        if self.max_length is not None:
            _check_positive_int("max_length", self.max_length)
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        _check_range("lr", self.lr, 0.0, math.inf, low_open=True)
        _check_range("lora_alpha", self.lora_alpha, 0.0, math.inf, low_open=True)
        _check_range("weight_decay", self.weight_decay, 0.0, math.inf)
        _check_range("max_grad_norm", self.max_grad_norm, 0.0, math.inf)
        _check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        _check_range("lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        _check_range("val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        self._check_mechanics()
        self._check_method_options()

    def _check_mechanics(self) -> None:
        """The `# mechanics` fields (a bool given as text, e.g. "true" from a hand-edited manifest, becomes a bool)."""
        object.__setattr__(self, "gradient_checkpointing", _as_bool("gradient_checkpointing", self.gradient_checkpointing))
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("optim", self.optim, OPTIMIZERS)
        _check_choice("early_stopping_metric", self.early_stopping_metric, WATCHED_METRICS)
        for name in ("eval_every", "early_stopping_patience", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.early_stopping_patience and not self.eval_every:
            raise ConfigError("early_stopping_patience needs eval_every > 0 (early stopping watches validations)")
        if not isinstance(self.resume, str):
            raise ConfigError(f"resume must be {RESUME_LATEST!r} or a checkpoint folder, got {self.resume!r}")

    def _check_method_options(self) -> None:
        """The `# method options` fields: types and ranges, and no option set for a method that ignores it."""
        for name in ("use_rslora", "use_dora"):
            object.__setattr__(self, name, _as_bool(name, getattr(self, name)))
        object.__setattr__(self, "trainable_modules", _as_module_names("trainable_modules", self.trainable_modules))
        _check_choice("qlora_quant_type", self.qlora_quant_type, QUANT_TYPES)
        _check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("prefix_hidden_size", "freeze_last_k"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.freeze_last_k is not None and self.trainable_modules:
            raise ConfigError("freeze takes freeze_last_k or trainable_modules, not both")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, users in METHOD_OPTION_USERS.items():
            if self.method not in users and getattr(self, name) != defaults[name]:
                raise ConfigError(f"{name} applies to method {' or '.join(users)}, not {self.method!r}")

    def resolved(self, task: str, target_modules: tuple[str, ...]) -> "TrainConfig":
        """A copy with `auto` / empty fields replaced by what the run actually used."""
        return dataclasses.replace(
            self, task=task, target_modules=self.target_modules or target_modules,
            max_length=self.max_length or DEFAULT_MAX_LENGTH[task],
        )

    def to_manifest(self) -> dict[str, Any]:
        """JSON-ready fields for the manifest's train_config (machine-local paths left out)."""
        data = dataclasses.asdict(self)
        for name in MACHINE_LOCAL_FIELDS:
            data.pop(name)
        data["out"] = str(self.out)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_manifest(cls, saved: Mapping[str, Any], **overrides: Any) -> "TrainConfig":
        """Rebuild a config from a manifest's train_config (unknown keys ignored), then apply overrides."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in saved.items() if k in known and k not in MACHINE_LOCAL_FIELDS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"saved train_config is incomplete: {exc}") from exc


def _as_names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    names = tuple(str(v).strip() for v in value)
    if any(not n for n in names):
        raise ConfigError(f"target_modules must be non-empty module names, got {value!r}")
    return names


def _as_module_names(name: str, value: Any) -> tuple[str, ...]:
    """A comma-separated string or a sequence -> a tuple of non-empty names ('' or () -> ())."""
    if isinstance(value, str):
        value = value.split(",") if value.strip() else ()
    names = tuple(str(v).strip() for v in value)
    if any(not n for n in names):
        raise ConfigError(f"{name} must be non-empty module names, got {value!r}")
    return names


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS or text in FALSE_WORDS:
        return text in TRUE_WORDS
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_range(name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")
