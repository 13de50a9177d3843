"""The base the onnxruntime backend's exports share: its name and fingerprint, tokenizer and context.

Every export carries its base's tokenizer and config, so the base weights are not needed to serve:
without --base, the first start-up export names the base (and lends its tokenizer); with --base, the
base is resolved as the torch backend resolves it, and every export must have been made from it.
Shaped like the torch engine's BaseModel where the routes look (prepared, tokenizer, can_generate,
context_length).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers import AutoConfig, AutoTokenizer

from adapters import PreparedBase, read_export_folder, resolve_base
from server.engine.base_model import is_decoder_only

DEFAULT_CONTEXT = 512


class NoBaseError(ValueError):
    """--backend onnxruntime was given neither --base nor a start-up export to learn the base from."""


@dataclass(frozen=True)
class OrtBase:
    prepared: PreparedBase  # name, fingerprint, and the folder its tokenizer and config came from
    tokenizer: transformers.PreTrainedTokenizerBase
    can_generate: bool
    context_length: int
    eos_ids: frozenset[int]

    @property
    def name(self) -> str:
        return self.prepared.name

    @property
    def fingerprint(self) -> str:
        return self.prepared.fingerprint


def load_ort_base(base: str | None, first_export: str | None, cache_dir: Path) -> OrtBase:
    """The base named by `base`, else the one `first_export` was made from."""
    if base is not None:
        prepared = resolve_base(base, cache_dir)
    elif first_export is not None:
        manifest = read_export_folder(first_export, check_files=False)  # the registry checks them when it adds it
        prepared = PreparedBase(manifest.base_name, Path(first_export), manifest.base_fingerprint)
    else:
        raise NoBaseError("--backend onnxruntime needs --base NAME or at least one --adapter NAME=EXPORT_DIR "
                          "to know which base its exports share")
    tokenizer = AutoTokenizer.from_pretrained(prepared.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(prepared.path)
    eos = getattr(config, "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
    return OrtBase(
        prepared=prepared, tokenizer=tokenizer, can_generate=is_decoder_only(config),
        context_length=int(getattr(config, "max_position_embeddings", DEFAULT_CONTEXT)),
        eos_ids=frozenset(int(i) for i in eos if i is not None),
    )
