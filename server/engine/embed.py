"""Sentence embeddings on an encoder base, per row with that row's adapter, as sentence-transformers computes them.

A sentence-transformers folder (all-MiniLM-L6-v2: `modules.json` = Transformer -> Pooling(mean) -> Normalize,
`sentence_bert_config.json` max_seq_length 256) says how its embeddings are made; `read_embedding_spec`
reads that once, and `embed_rows` applies it: the backbone's last hidden state, pooled over each row's real
tokens, then L2-normalized. A plain HF encoder folder (no sentence-transformers files) gets the common recipe,
mean pooling + normalize, up to the model's context length.

An adapter on the encoder applies its layers (LoRA, IA3, freeze) to its own rows; a classification adapter's
head is not used: its embedding is the backbone's output as that adapter trained it. Rows of one forward may
use different adapters.

Inputs are token ids, tokenized by the caller (the route: it must know each input's length to refuse the
long ones, and counts usage from them), so text and OpenAI's token-id inputs take the same path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from server.engine.base_model import BaseModel
from server.engine.loaded import LoadedAdapter

log = logging.getLogger(__name__)

POOLING_MODES = ("mean", "cls", "max")
DEFAULT_POOLING = "mean"
MEAN_EPS = 1e-9  # sentence-transformers' clamp on the token count (a row has at least one real token anyway)
MAX_PAD_FILL = -1e9  # sentence-transformers' value for padding positions under max pooling
ST_MODULES = "modules.json"
ST_CONFIG = "sentence_bert_config.json"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING_FLAGS = {  # Pooling's config.json flag -> our mode; the other flags are modes we do not serve
    "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class EmbeddingSpec:
    """How this base's embeddings are made, read once from its folder."""

    dimensions: int  # the embedding's size: the backbone's hidden size
    max_length: int  # tokens per input, special tokens included; longer inputs are refused (HTTP 400)
    pooling: str = DEFAULT_POOLING  # one of POOLING_MODES
    normalize: bool = True
    lowercase: bool = False  # sentence-transformers' do_lower_case: texts lowered before tokenizing
    unsupported: str | None = None  # why this base's sentence-transformers pipeline cannot be reproduced


def read_embedding_spec(folder: str | Path, dimensions: int, context_length: int) -> EmbeddingSpec:
    """The spec of the sentence-transformers pipeline in `folder`, or mean + normalize where there is none.
    Never raises: a pipeline we cannot reproduce (a Dense layer, another pooling) or a file we cannot read is
    recorded in `unsupported`, and /v1/embeddings refuses with that reason; the base still classifies."""
    folder = Path(folder)
    try:
        return _read_spec(folder, dimensions, context_length)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # json.JSONDecodeError is a ValueError
        log.warning("cannot read the sentence-transformers config in %s: %s", folder, exc)
        return EmbeddingSpec(dimensions, context_length,
                             unsupported=f"its sentence-transformers config cannot be read ({exc})")


def _read_spec(folder: Path, dimensions: int, context_length: int) -> EmbeddingSpec:
    max_length, lowercase = context_length, False
    config_file = folder / ST_CONFIG
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        max_length = min(int(config.get("max_seq_length") or context_length), context_length)
        lowercase = bool(config.get("do_lower_case", False))
    modules_file = folder / ST_MODULES
    if not modules_file.is_file():
        return EmbeddingSpec(dimensions, max_length, lowercase=lowercase)
    modules = json.loads(modules_file.read_text())
    types = [m["type"] for m in modules]
    others = [t for t in types if t not in (ST_TRANSFORMER, ST_POOLING, ST_NORMALIZE)]
    if others or types.count(ST_POOLING) != 1:
        return EmbeddingSpec(dimensions, max_length, lowercase=lowercase,
                             unsupported=f"its sentence-transformers modules {types} are not served (only "
                                         "Transformer -> Pooling [-> Normalize])")
    pooling_dir = next(m for m in modules if m["type"] == ST_POOLING)["path"]
    pooling_config = json.loads((folder / pooling_dir / "config.json").read_text())
    modes = _pooling_modes(pooling_config)
    normalize = ST_NORMALIZE in types
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        return EmbeddingSpec(dimensions, max_length, lowercase=lowercase, normalize=normalize,
                             unsupported=f"its pooling {modes} is not served (one of {', '.join(POOLING_MODES)})")
    return EmbeddingSpec(dimensions, max_length, pooling=modes[0], normalize=normalize, lowercase=lowercase)


def _pooling_modes(config: dict) -> list[str]:
    """The modes a sentence-transformers Pooling config turns on (newer versions also write `pooling_mode`)."""
    if isinstance(config.get("pooling_mode"), str):
        return [config["pooling_mode"]]
    return [mode for flag, mode in ST_POOLING_FLAGS.items() if config.get(flag)]


def embedding_spec(base: BaseModel) -> EmbeddingSpec | None:
    """The spec of an encoder base; None for a causal LM (it serves no embeddings)."""
    if base.can_generate:
        return None
    return read_embedding_spec(base.prepared.path, int(base.model.config.hidden_size), base.context_length)


def pool(hidden: torch.Tensor, mask: torch.Tensor, spec: EmbeddingSpec) -> torch.Tensor:
    """hidden [B, S, H], mask [B, S] (1: real token) -> [B, H] float32, as sentence-transformers' Pooling
    then Normalize compute it."""
    hidden = hidden.float()
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
    if spec.pooling == "mean":
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=MEAN_EPS)
    elif spec.pooling == "cls":
        pooled = hidden[:, 0]
    elif spec.pooling == "max":
        pooled = hidden.masked_fill(weights == 0, MAX_PAD_FILL).max(dim=1).values
    else:
        raise ValueError(f"pooling {spec.pooling!r} is not one of {POOLING_MODES}")
    if spec.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled


@torch.inference_mode()
def embed_rows(base: BaseModel, token_ids: list[list[int]], adapters: list[LoadedAdapter | None],
               spec: EmbeddingSpec) -> torch.Tensor:
    """token_ids[i] (special tokens included, non-empty) embedded with adapters[i]'s layers (None: the base
    alone), all in one right-padded backbone forward -> [B, H] float32 on the CPU."""
    if len(token_ids) != len(adapters):
        raise ValueError(f"{len(token_ids)} rows but {len(adapters)} adapters")
    device = base.backend.device
    longest = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), longest), base.tokenizer.pad_token_id, dtype=torch.long)  # [B, S]
    attention_mask = torch.zeros((len(token_ids), longest), dtype=torch.long)  # [B, S]
    for row, ids in enumerate(token_ids):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with base.adapters_for_rows(list(adapters)):
        hidden = base.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, S, H]
    return pool(hidden, attention_mask, spec).cpu()


@torch.inference_mode()
def embed_reference(base: BaseModel, ids: list[int], adapter: LoadedAdapter | None, spec: EmbeddingSpec) -> torch.Tensor:
    """The slow, obviously-correct reference: one row alone, no padding, pooled by a plain reduction -> [H]."""
    with base.adapters_for_rows([adapter]):
        hidden = base.backbone(input_ids=torch.tensor([ids], device=base.backend.device)).last_hidden_state[0].float()
    pooled = {"mean": lambda: hidden.mean(dim=0), "cls": lambda: hidden[0], "max": lambda: hidden.max(dim=0).values}
    vector = pooled[spec.pooling]()
    return (vector / vector.norm() if spec.normalize else vector).cpu()
