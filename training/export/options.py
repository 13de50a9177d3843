"""ExportOptions: what `training export` was asked to do, checked before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adapters import is_export_folder
from training.config import default_cache_dir
from training.errors import ConfigError

FORMATS = ("merged", "onnx", "int8", "int4")  # the public list (docs/architecture.md)
QUANTIZED_FORMATS = ("int8", "int4")  # quantized base checkpoints (adapters.quantized), the adapter merged or not
QUANTIZE = ("none", "int8")  # --quantize: the ONNX graph's own INT8 rewrite
DEFAULT_PARITY_ROWS = 256  # classification rows scored by torch and by each ONNX graph
DEFAULT_PARITY_PROMPTS = 4  # completion prompts decoded greedily by torch and by each ONNX graph
DEFAULT_PARITY_TOKENS = 16  # new tokens per parity prompt
DEFAULT_PERPLEXITY_TOKENS = 4096  # int8/int4 completion: held-out real text scored by both models


@dataclass(frozen=True)
class ExportOptions:
    adapter_dir: Path
    out: Path
    format: str = "onnx"
    quantize: str = "none"
    base: str | None = None  # default: the base named in the adapter's manifest
    data: str | None = None  # rows for the parity report; default: the adapter's own held-out rows
    parity_rows: int = DEFAULT_PARITY_ROWS
    parity_prompts: int = DEFAULT_PARITY_PROMPTS
    parity_tokens: int = DEFAULT_PARITY_TOKENS
    opset: int | None = None  # default: optimum's choice for the architecture
    threads: int = 0  # onnxruntime intra-op threads for the parity runs (0: its default)
    cache_dir: Path = field(default_factory=default_cache_dir)
    base_only: bool = False  # int8/int4: quantize the base alone (the adapter folder only names the base)
    perplexity_tokens: int = DEFAULT_PERPLEXITY_TOKENS

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter_dir", Path(self.adapter_dir).expanduser())
        object.__setattr__(self, "out", Path(self.out).expanduser())
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())
        if self.format not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.base_only and self.format not in QUANTIZED_FORMATS:
            raise ConfigError(
                f"--base-only applies to --format {' or '.join(QUANTIZED_FORMATS)} (a quantized base checkpoint); "
                f"a {self.format} export without its adapter would be the base itself")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.quantize != "none" and self.format != "onnx":
            raise ConfigError("--quantize applies to --format onnx only (--format int8 and int4 write a quantized "
                              "base checkpoint by themselves)")
        for name in ("parity_rows", "parity_prompts", "parity_tokens", "perplexity_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.opset is not None and not 11 <= self.opset <= 23:
            raise ConfigError(f"opset must be between 11 and 23, got {self.opset}")
        if self.threads < 0:
            raise ConfigError(f"threads must be 0 (onnxruntime's default) or more, got {self.threads}")
        self._check_out()

    def _check_out(self) -> None:
        """The output folder is replaced as a whole: never let that be the adapter or an unrelated folder."""
        out, adapter = self.out.resolve(), self.adapter_dir.resolve()
        if out == adapter or adapter in out.parents or out in adapter.parents:
            raise ConfigError(f"--out {str(self.out)!r} must not be, hold or sit inside the adapter folder")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(self.out)!r} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not is_export_folder(out):
            raise ConfigError(
                f"--out {str(self.out)!r} exists and is not an export folder; it would be replaced: "
                "choose a new path"
            )
