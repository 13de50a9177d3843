"""ServerConfig: the one config object of the serving side, and the only reader of os.environ there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapters import validate_adapter_name

DEFAULT_PORT = 8000
DEFAULT_BASE = "smollm2-135m"
ENV_CACHE = "LORAPLEX_CACHE"
ENV_STATE = "LORAPLEX_STATE"
ENV_ADMIN_TOKEN = "LORAPLEX_ADMIN_TOKEN"


def default_cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE, Path.home() / ".cache" / "loraplex"))


def default_state_dir() -> Path:
    """Where the admin token file lives: per user, readable only by them (the CLI finds it here)."""
    return Path(os.environ.get(ENV_STATE, Path.home() / ".local" / "state" / "loraplex"))


def env_admin_token() -> str | None:
    return os.environ.get(ENV_ADMIN_TOKEN) or None


class ServerConfig(BaseModel):
    """Everything `server serve` is told; built once, read by the app factory and the engine."""

    model_config = ConfigDict(frozen=True)

    backend: Literal["torch", "onnxruntime"] = Field(
        "torch", description="torch: adapter folders on one base; onnxruntime: export folders (training export)")
    base: str | None = Field(None, description="embedded base name, local HF folder or .gguf file (default "
                             f"{DEFAULT_BASE}; with onnxruntime, the base the start-up exports were made from)")
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    adapters: dict[str, str] = Field(default_factory=dict, description="adapters loaded at start: name -> folder")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quant: Literal["none", "int8", "int4", "nf4", "fp4"] = Field("none", description=(
        "quantized base: int8 / int4 (torch's kernels on CPU, bitsandbytes LLM.int8 / NF4 on CUDA), or nf4 / fp4 "
        "(bitsandbytes, as `training qlora` quantizes); adapters apply on top in the activation dtype"))
    max_model_len: int = Field(2048, gt=0, description="prompt + completion tokens per request, at most")
    max_tokens_limit: int = Field(1024, gt=0, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(64, gt=0)
    max_classify_batch: int = Field(64, gt=0, description="most inputs in one /v1/classify request")
    classify_max_length: int = Field(256, gt=0, description="tokens per classification input (truncated)")
    max_adapters: int = Field(256, gt=0, description="most adapters registered at once")
    max_cpu_loras: int = Field(64, gt=0, description="adapters kept loaded in memory (LRU); the rest re-read from disk")
    max_num_seqs: int = Field(16, gt=0, description="requests decoding at once (KV cache slots)")
    max_waiting: int = Field(256, gt=0, description="queued requests beyond which new ones get 429")
    max_num_batched_tokens: int = Field(2048, gt=0, description="prompt tokens prefilled in one step")
    max_loras: int = Field(32, gt=0, description="distinct adapters in the running batch (= device LoRA slots)")
    merge: bool = Field(False, description="single-tenant mode: merge the hot adapter into the base weights")
    lora_kernel: Literal["stacked", "loop"] = Field("stacked", description="batched LoRA math; loop is the reference")
    admin_token: str | None = Field(default_factory=env_admin_token, repr=False)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    state_dir: Path = Field(default_factory=default_state_dir)
    served_name: str | None = Field(None, description="model id of the base in /v1/models; default: base name")
    ort_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per session (0: one per core)")
    threads: int = Field(0, ge=0, description="torch intra-op threads of the model's worker threads (0: the default)")

    @model_validator(mode="before")
    @classmethod
    def _default_base(cls, data):
        """The torch backend loads a base, so it has a default; onnxruntime can learn it from its exports."""
        if isinstance(data, dict) and data.get("base") is None and data.get("backend", "torch") == "torch":
            data = {**data, "base": DEFAULT_BASE}
        return data

    @model_validator(mode="after")
    def _merge_needs_full_precision(self) -> "ServerConfig":
        """Merging into quantized weights would requantize them with every swap: lossy, so refused."""
        if self.merge and self.quant != "none" and self.backend == "torch":
            raise ValueError(f"--merge with --quant {self.quant}: merging an adapter into quantized weights would "
                             "requantize them at every swap (lossy); serve mixed batches on the quantized base "
                             "(drop --merge), or export the adapter merged and quantized once: "
                             "`training export ADAPTER --format int8|int4 --out DIR`, then `server serve --base DIR`")
        return self

    @model_validator(mode="after")
    def _backend_options(self) -> "ServerConfig":
        if self.backend == "onnxruntime":
            refused = {"--merge": self.merge, f"--quant {self.quant}": self.quant != "none",
                       "--device cuda": self.device == "cuda"}
            given = [flag for flag, on in refused.items() if on]
            if given:
                raise ValueError(f"{', '.join(given)}: not available with --backend onnxruntime (exports are merged "
                                 "already, quantized by `training export --quantize int8`, and run on the CPU)")
            if self.base is None and not self.adapters:
                raise ValueError("--backend onnxruntime needs --base NAME or at least one --adapter NAME=EXPORT_DIR "
                                 "to know which base its exports share")
        return self

    @field_validator("adapters")
    @classmethod
    def _names_are_safe(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            validate_adapter_name(name)
        return value
