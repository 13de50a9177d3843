"""ServerConfig: the one config object of the serving side, the one source of every default and help text,
and the only reader of os.environ there.

Every field is also a `server serve` flag (server/flags.py derives them: `max_num_seqs` is `--max-num-seqs`,
its description the help) and an environment variable `LORAPLEX_<FIELD>` (`LORAPLEX_MAX_NUM_SEQS=8`);
a flag beats the environment, the environment beats the default (pydantic-settings' order of sources).
A field whose `json_schema_extra` says `cli: False` is not a flag (secrets that would show in `ps`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters import validate_adapter_name

DEFAULT_PORT = 8000
DEFAULT_BASE = "smollm2-135m"
ENV_PREFIX = "LORAPLEX_"
ENV_CACHE = "LORAPLEX_CACHE"
ENV_STATE = "LORAPLEX_STATE"
ENV_ADMIN_TOKEN = "LORAPLEX_ADMIN_TOKEN"
NOT_A_FLAG = {"cli": False}


def default_cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE, Path.home() / ".cache" / "loraplex"))


def default_state_dir() -> Path:
    """Where the admin token file lives: per user, readable only by them (the CLI finds it here)."""
    return Path(os.environ.get(ENV_STATE, Path.home() / ".local" / "state" / "loraplex"))


def env_admin_token() -> str | None:
    return os.environ.get(ENV_ADMIN_TOKEN) or None


class ServerConfig(BaseSettings):
    """Everything `server serve` is told; built once, read by the app factory and the engine."""

    model_config = SettingsConfigDict(frozen=True, env_prefix=ENV_PREFIX, populate_by_name=True, extra="forbid")

    backend: Literal["torch", "onnxruntime"] = Field(
        "torch", description="torch: adapter folders on one base; onnxruntime: export folders (training export)")
    base: str | None = Field(None, description="embedded base name (smollm2-135m, minilm-l6), local HF folder or "
                             f".gguf file (default {DEFAULT_BASE}; with onnxruntime, the base the exports were made from)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="port to listen on")
    adapters: dict[str, str] = Field(default_factory=dict, description="an adapter to load at start (repeatable)",
                                     json_schema_extra={"flag": "--adapter", "metavar": "NAME=PATH"})
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when there is one, else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="activation dtype; auto is float32 on CPU (matches PEFT token for token), bfloat16 on CUDA")
    quant: Literal["none", "int8", "int4", "nf4", "fp4"] = Field("none", description=(
        "quantized base: int8 / int4 (torch's kernels on CPU, bitsandbytes LLM.int8 / NF4 on CUDA), or nf4 / fp4 "
        "(bitsandbytes, as `training qlora` quantizes); adapters apply on top in the activation dtype"))
    max_model_len: int = Field(2048, gt=0, description="prompt + completion tokens per request, at most")
    max_tokens_limit: int = Field(1024, gt=0, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(64, gt=0, description="max_tokens of a request that names none")
    max_classify_batch: int = Field(64, gt=0, description="most inputs in one /v1/classify or /v1/embeddings "
                                    "request, and rows in one batched encoder forward")
    classify_max_length: int = Field(256, gt=0, description="tokens per classification input (truncated)")
    max_adapters: int = Field(256, gt=0, description="most adapters registered at once")
    max_cpu_loras: int = Field(64, gt=0, description="adapters kept loaded in memory (LRU); the rest re-read from disk")
    max_num_seqs: int = Field(16, gt=0, description="requests decoding at once (KV cache slots)")
    max_waiting: int = Field(256, gt=0, description="queued requests beyond which new ones get 429")
    max_num_batched_tokens: int = Field(2048, gt=0, description="prompt tokens prefilled in one step")
    max_loras: int = Field(32, gt=0, description="distinct adapters in the running batch (= device LoRA slots)")
    merge: bool = Field(False, description="single-tenant mode: merge the hot adapter into the base weights, "
                        "swap on demand")
    lora_kernel: Literal["stacked", "loop"] = Field("stacked", description="batched LoRA math; loop is the reference")
    admin_token: str | None = Field(default_factory=env_admin_token, repr=False, json_schema_extra=NOT_A_FLAG,
                                    description="admin bearer token (env LORAPLEX_ADMIN_TOKEN; default: generated)")
    cache_dir: Path = Field(default_factory=default_cache_dir, validation_alias=ENV_CACHE,
                            description="where embedded bases are prepared (env LORAPLEX_CACHE)")
    state_dir: Path = Field(default_factory=default_state_dir, validation_alias=ENV_STATE,
                            description="admin token and runtime state (env LORAPLEX_STATE)")
    adapter_roots: list[Path] = Field(default_factory=list, json_schema_extra={"flag": "--adapter-root", "metavar": "DIR"},
                                      description=(
        "a folder runtime adapter paths must lie inside, symlinks resolved (repeatable); default: the folders "
        "holding the --adapter paths, and the state dir"))
    max_adapter_bytes: int = Field(2 << 30, gt=0, description="largest adapter folder (its files' total bytes) "
                                   "an add may load")
    max_lora_rank: int = Field(64, gt=0, description="largest LoRA rank an adapter may have (device slots are "
                               "padded to the largest resident rank)")
    served_name: str | None = Field(None, description="model id of the base in /v1/models; default: base name")
    ort_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per session (0: one per core)")
    threads: int = Field(0, ge=0, description="torch intra-op threads of the model's worker threads (0: one per core)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    shutdown_timeout: float = Field(20.0, ge=0, description=(
        "seconds a SIGTERM waits for accepted requests (running and queued) to finish before answering the rest "
        "503; under Kubernetes' default 30 s grace period"))
    request_timeout: float = Field(0.0, ge=0, description=(
        "seconds a request may spend in the engine (queued + running) before it is answered 504 and its slot "
        "freed; 0: no limit"))
    max_request_bytes: int = Field(1 << 20, gt=0, description="largest request body in bytes; larger ones get 413")
    max_classify_waiting: int = Field(256, gt=0, description="queued /v1/classify and /v1/embeddings requests "
                                      "beyond which new ones get 429")
    api_key: str | None = Field(None, repr=False, description=(
        "API key the inference routes require as `Authorization: Bearer KEY` (vLLM's --api-key; env "
        "LORAPLEX_API_KEY keeps it out of `ps`); not an admin token"))
    api_key_file: Path | None = Field(None, description=(
        "file of API keys, one per line (# comments), accepted beside --api-key; read at start"))

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

    @field_validator("admin_token")
    @classmethod
    def _empty_token_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("adapters")
    @classmethod
    def _names_are_safe(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            validate_adapter_name(name)
        return value


def config_default(name: str):
    """A field's default, for the engine's own defaults: they are written only here."""
    return ServerConfig.model_fields[name].default
