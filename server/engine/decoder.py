"""The transformer stack the batched runner drives: token ids in, final-norm hidden states out.

Two implementations, chosen once per base (`make_decoder`):

- `LlamaDecoder`, a lean forward for Llama-family bases written over the base's own modules (the same
  weights and LoraLinear wrappers, so every adapter applies unchanged). It does HF's math with less
  per-step overhead: no kwargs plumbing or mask re-derivation per layer, one RoPE table per forward,
  and grouped-query attention without copying K/V once per query head (the query heads that share a
  K/V head are folded into the query length of one attention call).
- `HFDecoder`, the base's own HF backbone, for every other architecture. It is also the reference the
  lean forward is tested against.

Both take the runner's 4D additive mask [B, 1, S, L], positions [B, S] and a `SlotKVCache`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.kv_cache import SlotKVCache

LEAN_MODEL_TYPES = ("llama",)


Embeds = list[tuple[int, torch.Tensor]]  # (row, [V, hidden]): replaces that row's first V input embeddings


class Decoder(Protocol):
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 cache: SlotKVCache, embeds: Embeds = ()) -> torch.Tensor:
        """[B, S] ids -> [B, S, hidden], after the final norm."""
        ...


def embed(embedding: nn.Module, input_ids: torch.Tensor, embeds: Embeds) -> torch.Tensor:
    """Token embeddings, with prompt tuning's virtual tokens put in place of their rows' placeholders."""
    hidden = embedding(input_ids)
    for row, virtual in embeds:
        hidden[row, : virtual.shape[0]] = virtual
    return hidden


def make_decoder(model: nn.Module, lean: bool = True, fused: dict | None = None) -> Decoder:
    """The lean forward where the architecture has one (and `lean`), else HF's backbone. `fused`: the
    base's fused projections (fused.py), which the lean forward calls in place of their members."""
    if lean and LlamaDecoder.supports(model):
        return LlamaDecoder(model, fused or {})
    return HFDecoder(getattr(model, model.base_model_prefix))


class HFDecoder:
    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 cache: SlotKVCache, embeds: Embeds = ()) -> torch.Tensor:
        query_len = input_ids.shape[1]
        inputs = ({"inputs_embeds": embed(self.backbone.get_input_embeddings(), input_ids, embeds)} if embeds
                  else {"input_ids": input_ids})
        return self.backbone(
            **inputs, attention_mask=mask, position_ids=positions, past_key_values=cache,
            cache_position=torch.arange(query_len, device=input_ids.device), use_cache=True,
        ).last_hidden_state


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's exact arithmetic (computed in float32, scaled in the input dtype)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as HF applies it: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q [B, H, S, d], k/v [B, KVH, L, d], mask [B, 1, S, L] -> [B, S, H * d].

    Query head h reads K/V head h // (H // KVH), as HF's repeat_kv lays them out. The `rep` query heads
    of one K/V head become `rep * S` query rows of a single attention call over that K/V head, so K/V
    are read in place; row r * S + s takes mask row s.
    """
    batch, heads, seq, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    q = q.reshape(batch, kv_heads, rep * seq, dim)
    if seq > 1 and rep > 1:
        mask = mask[:, :, None].expand(batch, 1, rep, seq, keys).reshape(batch, 1, rep * seq, keys)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, KVH, rep * S, d]
    # Only split and permute (views for any strides), then one reshape: CUDA's fused kernels return `out`
    # in a transposed memory layout, on which merging KVH and rep with `.view` fails.
    return out.unflatten(2, (rep, seq)).permute(0, 3, 1, 2, 4).reshape(batch, seq, heads * dim)


class LlamaDecoder:
    @staticmethod
    def supports(model: nn.Module) -> bool:
        config = model.config
        inner = getattr(model, "model", None)
        return (
            config.model_type in LEAN_MODEL_TYPES
            and getattr(config, "pretraining_tp", 1) == 1
            and inner is not None and hasattr(inner, "rotary_emb") and hasattr(inner, "layers")
        )

    def __init__(self, model: nn.Module, fused: dict | None = None) -> None:
        inner = model.model
        self.fused = fused or {}
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm_weight, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.layers = list(inner.layers)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 cache: SlotKVCache, embeds: Embeds = ()) -> torch.Tensor:
        hidden = embed(self.embed, input_ids, embeds)  # [B, S, hidden]
        cos, sin = self.rotary(hidden, positions)  # [B, S, head_dim]
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        for index, layer in enumerate(self.layers):
            hidden = hidden + self._attention(layer, hidden, cos, sin, mask, cache, index, self.fused.get((index, "qkv")))
            hidden = hidden + self._mlp(layer, hidden, self.fused.get((index, "gate_up")))
        return rms_norm(hidden, self.norm_weight, self.norm_eps)

    @staticmethod
    def _attention(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, cache: SlotKVCache, index: int, qkv=None) -> torch.Tensor:
        attn, norm = layer.self_attn, layer.input_layernorm
        x = rms_norm(hidden, norm.weight, norm.variance_epsilon)
        batch, seq, _ = x.shape
        dim = attn.head_dim
        q, k, v = qkv(x) if qkv is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
        q = q.view(batch, seq, -1, dim).transpose(1, 2)  # [B, H, S, d]
        k = k.view(batch, seq, -1, dim).transpose(1, 2)  # [B, KVH, S, d]
        v = v.view(batch, seq, -1, dim).transpose(1, 2)
        k, v = cache.update(rotate(k, cos, sin), v, index)  # -> [B, KVH, L, d]
        out = grouped_attention(rotate(q, cos, sin), k, v, mask, attn.scaling)
        return attn.o_proj(out)

    @staticmethod
    def _mlp(layer: nn.Module, hidden: torch.Tensor, gate_up=None) -> torch.Tensor:
        mlp, norm = layer.mlp, layer.post_attention_layernorm
        x = rms_norm(hidden, norm.weight, norm.variance_epsilon)
        gate, up = gate_up(x) if gate_up is not None else (mlp.gate_proj(x), mlp.up_proj(x))
        return mlp.down_proj(mlp.act_fn(gate) * up)
