"""One base matmul for the linears of a layer that read the same input: q, k, v and gate, up.

A decode step at 8 rows is short, wide matmuls; on this project's 2-core CPU oneDNN ran q, k, v as one
[960 x 576] product in 142 us against 267 us as three, and gate, up as one [3072 x 576] in 287 us against
390 us as two (SmolLM2's shapes, packed weights). The fused weight is packed once, from the members'
plain weights, and the members give up their own packed copies (they keep their plain weights, and
compute from them when they are called alone: the HF reference forward, a batch that needs a member's
own input), so a fused base holds the same bytes as an unfused one. Where weights are not packed
(F.linear), the members' weights become row views of the fused matrix instead.

Each member's adapters then apply to its slice of the fused output, exactly as they would to its own
output: LoRA deltas (ActiveAdapters.apply), IA3 output scales and freeze rows' replacements all work on
a view. A batch with an IA3 row that scales a member's INPUT cannot share the matmul; it runs every
member alone. Whoever changes a member's plain weight calls its `repack()`, which repacks the fused
weight too (merge mode).

On a quantized base (native CPU kernels) the members' matrices are stacked by output row into one
(quant_native.fuse_rows) and become row views of it: one kernel call where there were three, the
same bytes, and a member called alone computes from its own rows. SmolLM2-135M at batch 1 on this
project's CPU runs 7 base matmuls a layer where a decode step's other work per call (OpenMP fork and
barrier, the Python around it) is a large part of the call; fusing makes it 4. Kinds that cannot be
stacked (bitsandbytes, torch's packed int4) are left unfused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.backend import LinearFn, PackFn, no_pack
from server.engine.lora_layer import LoraLinear
from server.engine.quant_kernels import quant_linear
from server.engine.quant_native import fuse_rows, stackable

GROUPS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "gate_up": ("mlp", ("gate_proj", "up_proj"))}


class FusedLinear:
    def __init__(self, members: list[LoraLinear], linear: LinearFn, pack: PackFn) -> None:
        """`linear`, `pack`: the full-precision backend's; a quantized fusion runs `quant_linear` on the
        members' stacked matrix (quantized members hold no plain weight: `base.weight` is None)."""
        self.members = members
        self.active = members[0].active
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for member in members:
            self.bounds.append((start, start + member.base.out_features))
            start += member.base.out_features
        self.names = {member.name for member in members}
        self.bias = _cat_bias(members)
        if members[0].base.weight is None:
            self.weight = fuse_rows([member.kernel_weight for member in members])
            self.linear, self.pack, self.shared = quant_linear, no_pack, True
            for member in members:  # alone, each runs its own quantized rows (views of the fused matrix)
                member.fused = self
            return
        self.linear, self.pack = linear, pack
        # Unpacked (F.linear: a GPU, bf16 on a CPU without bf16 oneDNN): the members' weights become row
        # views of one fused matrix, so the fusion costs no memory and in-place merges update it.
        self.shared = pack is no_pack
        if self.shared:
            self.weight = torch.cat([member.base.weight.detach() for member in members])
            for member, (lo, hi) in zip(members, self.bounds):
                member.base.weight.data = self.weight[lo:hi]
        self.repack()
        for member in members:  # alone, a member computes from its plain weight; a repack repacks the fusion
            member.linear, member.pack, member.kernel_weight = F.linear, no_pack, member.base.weight
            member.fused = self

    def repack(self) -> None:
        if not self.shared:  # shared: the members' weights are views of self.weight, changed in place with it
            self.weight = self.pack(torch.cat([member.base.weight for member in self.members]).detach())
        self.bias = _cat_bias(self.members)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B, S, in] -> each member's output [B, S, out_i] (views of one fused output where possible)."""
        active = self.active
        if active.ia3_or_freeze and active.ia3.on and self.names & active.ia3.inputs.keys():
            return [member(x) for member in self.members]
        out = self.linear(x, self.weight, self.bias)
        pieces = []
        for member, (lo, hi) in zip(self.members, self.bounds):
            piece = out[..., lo:hi]
            if active.ia3_or_freeze:
                piece = active.ia3.scale_output(member.name, piece)
                piece = active.dense.replace(member.name, x, piece, member.base.bias)
            pieces.append(active.apply(member.name, x, piece))
        return pieces


def _cat_bias(members: list[LoraLinear]) -> torch.Tensor | None:
    biases = [member.base.bias for member in members]
    if all(b is None for b in biases):
        return None
    like = next(b for b in biases if b is not None)
    return torch.cat([b if b is not None else like.new_zeros(m.base.out_features)
                      for b, m in zip(biases, members)]).detach()


def _fusable(members: list) -> bool:
    if not all(isinstance(m, LoraLinear) for m in members):
        return False
    if all(m.base.weight is not None for m in members):
        return True
    return stackable([m.kernel_weight for m in members])


def fuse_llama_projections(model: nn.Module, linear: LinearFn, pack: PackFn) -> dict[tuple[int, str], FusedLinear]:
    """{(layer index, "qkv" | "gate_up"): FusedLinear} for a Llama-family model whose projections are
    LoraLinears, full-precision or on stackable quantized matrices; {} when any is neither."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return {}
    groups: dict[tuple[int, str], list[LoraLinear]] = {}
    for index, layer in enumerate(layers):
        for key, (parent, names) in GROUPS.items():
            owner = getattr(layer, parent, None)
            members = [getattr(owner, name, None) for name in names]
            if not _fusable(members):
                return {}
            groups[(index, key)] = members
    return {key: FusedLinear(members, linear, pack) for key, members in groups.items()}
