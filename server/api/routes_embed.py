"""POST /v1/embeddings (OpenAI's shape) on an encoder base, with the base alone or an adapter on it.

`model` selects the adapter as everywhere: the base's own name is the base's embeddings; a classification
adapter's name is the embedding of the backbone with that adapter's layers (its head unused).

What is refused, with a 400 naming the cause (OpenAI's choices where it has one):
- a causal LM base (embeddings need an encoder), the onnxruntime backend (its exports hold a classification
  head's logits, not hidden states), `--merge` mode, a sentence-transformers pipeline we cannot reproduce;
- `dimensions` other than the model's size (no Matryoshka truncation is served);
- no input, an empty text or token list, more inputs than --max-classify-batch, token ids outside the
  vocabulary, and an input longer than the model's max length: refused as OpenAI refuses over-length input,
  not truncated (sentence-transformers truncates at max_seq_length; a silent cut would embed a different text).
Token-id inputs are taken as given: no special tokens are added ([CLS] ... [SEP] are the caller's to include).
"""

from __future__ import annotations

import base64

import numpy as np
import torch
from fastapi import APIRouter, Request

from server.api.batched import run_batched
from server.api.errors import ApiError, engine_error
from server.api.schemas import (EmbeddingItem, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage,
                                error_responses)
from server.api.state import AppState, State
from server.engine.classify_batcher import EmbedJob
from server.engine.embed import EmbeddingSpec

router = APIRouter(tags=["embeddings"], responses=error_responses(400, 404, 409, 429, 500, 503, 504))

LITTLE_ENDIAN_F32 = np.dtype("<f4")  # what OpenAI's base64 holds, and what its client decodes


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request, state: State) -> EmbeddingResponse:
    spec = _served_spec(state)
    if body.dimensions is not None and body.dimensions != spec.dimensions:
        raise ApiError(400, f"dimensions {body.dimensions} is not served: this model's embeddings have "
                            f"{spec.dimensions} dimensions (omit dimensions or send {spec.dimensions})",
                       param="dimensions")
    token_ids = _token_ids(state, body, spec)
    adapter = await state.acquire_model(body.model)
    try:
        request.state.adapter_label = state.metrics.adapter_label(adapter.name if adapter else None)
        outcome = await run_batched(state.classifier, lambda done: EmbedJob(token_ids, adapter, done))
    finally:
        state.release_model(adapter)
    if isinstance(outcome, BaseException):
        raise engine_error(outcome, "embedding failed") from outcome
    tokens = sum(len(ids) for ids in token_ids)
    state.metrics.embedded_inputs.labels(request.state.adapter_label).inc(len(token_ids))
    state.metrics.prompt_tokens.labels(request.state.adapter_label).inc(tokens)
    encode = _base64 if body.encoding_format == "base64" else _floats
    return EmbeddingResponse(
        model=body.model,
        data=[EmbeddingItem(index=i, embedding=encode(row)) for i, row in enumerate(outcome)],
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _served_spec(state: AppState) -> EmbeddingSpec:
    """This server's embedding spec, or the 400 that says why it serves none."""
    if state.config.backend == "onnxruntime":
        raise ApiError(400, "/v1/embeddings is not served by --backend onnxruntime (its exports return a "
                            "classification head's logits, not hidden states); serve the base with --backend torch")
    if state.base.can_generate:
        raise ApiError(400, f"base {state.served_name!r} is a causal LM; /v1/embeddings needs an encoder base "
                            "(such as minilm-l6)")
    if state.config.merge:
        raise ApiError(400, "embeddings are not served in --merge mode (the base weights hold an adapter)")
    spec: EmbeddingSpec | None = state.classifier.embedding
    if spec is None:  # an encoder always has one; kept so that a new base kind fails with words, not a 500
        raise ApiError(400, f"base {state.served_name!r} serves no embeddings")
    if spec.unsupported:
        raise ApiError(400, f"base {state.served_name!r} serves no embeddings: {spec.unsupported}")
    return spec


def _token_ids(state: AppState, body: EmbeddingRequest, spec: EmbeddingSpec) -> list[list[int]]:
    """Every input as token ids (texts tokenized with special tokens, as sentence-transformers does), checked."""
    inputs = body.input
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]  # one text, or one input as token ids
    if not inputs:
        raise ApiError(400, "input must hold at least one text or token list", param="input")
    limit = state.config.max_classify_batch
    if len(inputs) > limit:
        raise ApiError(400, f"input holds {len(inputs)} inputs; this server takes at most {limit} per request "
                            "(--max-classify-batch)", param="input")
    if isinstance(inputs[0], str):
        if any(not text for text in inputs):
            raise ApiError(400, "inputs must not be empty strings", param="input")
        texts = [text.lower() for text in inputs] if spec.lowercase else list(inputs)
        token_ids = state.base.tokenizer(texts, add_special_tokens=True)["input_ids"]
    else:
        token_ids = [list(ids) for ids in inputs]
        vocab = state.base.model.get_input_embeddings().num_embeddings
        for i, ids in enumerate(token_ids):
            if not ids:
                raise ApiError(400, f"input {i} is an empty token list", param="input")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(400, f"input {i} holds token id {bad}, outside this model's vocabulary "
                                    f"(0..{vocab - 1})", param="input")
    for i, ids in enumerate(token_ids):
        if len(ids) > spec.max_length:
            raise ApiError(400, f"input {i} is {len(ids)} tokens long; this model embeds at most "
                                f"{spec.max_length} tokens per input (special tokens included): shorten or split it",
                           param="input")
    return token_ids


def _floats(row: torch.Tensor) -> list[float]:
    return row.tolist()


def _base64(row: torch.Tensor) -> str:
    return base64.b64encode(row.numpy().astype(LITTLE_ENDIAN_F32).tobytes()).decode("ascii")
