"""The loop reference for the SGMV kernels (sgmv.py): same signatures, obviously correct, slow.

For each adapter present in the batch, gather its tokens and do the two matmuls in float32:

    shrunk[rows, :r]  = x[rows] @ A.T                     A       = a_pool[offset : offset + r]
    out[rows]        += shrunk[rows, :r] @ (scaling * B.T) scaled = b_pool[offset : offset + r]

Tokens whose adapter is -1, or whose adapter has rank 0 in this module, get zeros from the shrink and
nothing added by the expand. It reads token_adapter, offsets and ranks on the host (a device sync per
call): a test oracle, never a serving path.
"""

from __future__ import annotations

import torch

from server.engine.kernels.lora_pool import LoraPool, check_expand_args, check_shrink_args

NO_ADAPTER = -1


def _groups(offsets: torch.Tensor, ranks: torch.Tensor, token_adapter: torch.Tensor,
            max_rank: int | None) -> list[tuple[torch.Tensor, int, int]]:
    """(token rows, offset, rank) of each adapter in the batch with a non-zero rank."""
    slots = offsets.shape[0]
    groups = []
    for adapter in token_adapter.unique().tolist():
        if adapter == NO_ADAPTER:
            continue
        if not 0 <= adapter < slots:
            raise ValueError(f"token_adapter holds {adapter}, outside -1..{slots - 1}")
        offset, rank = int(offsets[adapter]), int(ranks[adapter])
        if max_rank is not None and rank > max_rank:
            raise ValueError(f"adapter {adapter} has rank {rank}, above max_rank {max_rank}")
        if rank:
            groups.append(((token_adapter == adapter).nonzero().squeeze(1), offset, rank))
    return groups


def lora_shrink(x: torch.Tensor, a_pool: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
                token_adapter: torch.Tensor, max_rank: int) -> torch.Tensor:
    """x [T, in] -> float32 [T, max_rank]: row t = x_t @ A_{adapter(t)}.T, zeros past its rank."""
    check_shrink_args(x, a_pool, offsets, ranks, token_adapter, max_rank)
    shrunk = torch.zeros(x.shape[0], max_rank, device=x.device, dtype=torch.float32)
    for rows, offset, rank in _groups(offsets, ranks, token_adapter, max_rank):
        shrunk[rows, :rank] = x[rows].float() @ a_pool[offset:offset + rank].float().T
    return shrunk


def lora_expand(shrunk: torch.Tensor, b_pool: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
                token_adapter: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [T, out_features] += shrunk_t[:rank] @ b_pool rows of adapter(t), in place; returns out."""
    check_expand_args(shrunk, b_pool, offsets, ranks, token_adapter, out)
    for rows, offset, rank in _groups(offsets, ranks, token_adapter, shrunk.shape[1]):
        delta = shrunk[rows, :rank].float() @ b_pool[offset:offset + rank].float()
        out[rows] = (out[rows].float() + delta).to(out.dtype)
    return out


def apply_lora(x: torch.Tensor, out: torch.Tensor, pool: LoraPool, token_adapter: torch.Tensor) -> torch.Tensor:
    """out += each token's LoRA delta from `pool` (shrink then expand); returns out."""
    shrunk = lora_shrink(x, pool.a_pool, pool.offsets, pool.ranks, token_adapter, pool.max_rank)
    return lora_expand(shrunk, pool.b_pool, pool.offsets, pool.ranks, token_adapter, out)
