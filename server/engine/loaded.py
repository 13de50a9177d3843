"""An adapter as the engine holds it: weights on the serving device and dtype, head, labels, version.

A request keeps a reference to the LoadedAdapter it was admitted with, so replacing an adapter
under the same name never changes the weights a running request decodes with. A Combination (a request's
`model` of "a:0.7+b:0.3") holds its parents' LoadedAdapters the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters import AdapterFolder, AdapterMismatchError, LoraWeights
from adapters.dense import HEAD_MODULES, DenseWeights
from adapters.ia3_spec import IA3Scale


@dataclass(frozen=True)
class ClassificationHead:
    """logits = pooled @ weight.T + bias; weight [num_labels, hidden]."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class LoadedAdapter:
    name: str
    version: int
    task: str
    source: Path
    rank: int
    lora: dict[str, LoraWeights]
    head: ClassificationHead | None = None
    metadata: dict = field(default_factory=dict)
    pinned: bool = False  # once in a device slot, never evicted from it
    # prompt learning (completion only), applied to the request's own row at its prefill:
    virtual_tokens: torch.Tensor | None = None  # prompt tuning: [V, hidden], embeddings before the prompt's
    prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None  # prefix / P-tuning v2: per layer (k, v)
    ia3: dict[str, IA3Scale] = field(default_factory=dict)  # IA3: per module, a vector on its input or output
    dense: dict[str, DenseWeights] = field(default_factory=dict)  # freeze: per module, weights in place of the base's

    @property
    def in_layers(self) -> bool:
        """Whether the adapter changes the base's linears (LoRA, IA3 or freeze) for its rows."""
        return bool(self.lora or self.ia3 or self.dense)

    @property
    def num_virtual_tokens(self) -> int:
        """Positions the adapter puts before the prompt in the request's KV cache slot."""
        if self.virtual_tokens is not None:
            return self.virtual_tokens.shape[0]
        if self.prefix:
            return self.prefix[0][0].shape[1]
        return 0

    @property
    def members(self) -> tuple[LoadedAdapter, ...]:
        """The registered adapters a row of this model uses (each takes a LoRA slot and counts toward
        --max-loras): the adapter itself."""
        return (self,)

    @property
    def lora_parts(self) -> tuple[tuple[LoadedAdapter, float], ...]:
        """(adapter, weight) pairs whose LoRA deltas a row sums: itself at weight 1, or none (not LoRA)."""
        return ((self, 1.0),) if self.lora else ()


@dataclass(frozen=True, eq=False)
class Combination:
    """A per-request weighted combination of LoRA completion adapters: a row's delta is
    sum_i weight_i * scaling_i * B_i A_i over its parents (PEFT's `cat` merge of the same parents, computed
    in the batch kernels from the parents' own slots; never merged into the base, no folder written).

    Shaped like a LoadedAdapter where the engine reads one (no prompt learning, IA3 or freeze parts).
    `name` is the request's canonical string; `version` names each parent's version ("a=3,b=1").
    """

    parts: tuple[tuple[LoadedAdapter, float], ...]
    task: str = "completion"
    ia3: dict = field(default_factory=dict)
    dense: dict = field(default_factory=dict)
    virtual_tokens: None = None
    prefix: None = None
    num_virtual_tokens: int = 0
    in_layers: bool = True
    pinned: bool = False
    head: None = None

    def __post_init__(self) -> None:
        if not self.parts or any(not a.lora or a.ia3 or a.dense or a.num_virtual_tokens or a.task != "completion"
                                 for a, _ in self.parts):
            raise ValueError("a combination's parents are LoRA completion adapters")

    @property
    def name(self) -> str:
        return "+".join(f"{a.name}:{w:g}" for a, w in self.parts)

    @property
    def version(self) -> str:
        return ",".join(f"{a.name}={a.version}" for a, _ in self.parts)

    @property
    def members(self) -> tuple[LoadedAdapter, ...]:
        return tuple(a for a, _ in self.parts)

    @property
    def lora_parts(self) -> tuple[tuple[LoadedAdapter, float], ...]:
        return self.parts

    @property
    def rank(self) -> int:
        return sum(a.rank for a, _ in self.parts)


RowModel = LoadedAdapter | Combination  # what one batch row runs with (None: the base alone)


def load_adapter(name: str, version: int, folder: AdapterFolder, device: torch.device, dtype: torch.dtype,
                 pinned: bool = False, lora_home: torch.device | None = None) -> LoadedAdapter:
    """Move a validated adapter's tensors to the serving device/dtype and build its head, if any.
    `lora_home` (default: `device`): where its LoRA weights live; in host memory for a GPU's slots
    (BaseModel.lora_home), pinned there so that a slot load copies them without waiting."""
    home = device if lora_home is None else lora_home
    lora = {module: LoraWeights(a=_at(w.a, home, dtype, device), b=_at(w.b, home, dtype, device), scaling=w.scaling)
            for module, w in folder.lora.items()}
    ia3 = {module: IA3Scale(vector=s.vector.to(device=device, dtype=dtype), on_input=s.on_input)
           for module, s in folder.ia3.items()}
    dense = {module: DenseWeights(weight=w.weight.to(device=device, dtype=dtype),
                                  bias=None if w.bias is None else w.bias.to(device=device, dtype=dtype))
             for module, w in folder.dense.items()}
    head = _head(folder, device, dtype) if folder.task == "classification" else None
    ranks = {w.rank for w in lora.values()}
    virtual_tokens, prefix = None, None
    if folder.prompt is not None and folder.prompt.spec.kind == "prompt":
        virtual_tokens = folder.prompt.embeddings.to(device=device, dtype=dtype)
    elif folder.prompt is not None:
        prefix = tuple((k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype))
                       for k, v in folder.prompt.prefix_layers())
    return LoadedAdapter(
        name=name, version=version, task=folder.task, source=folder.path, rank=max(ranks, default=0), lora=lora,
        head=head, metadata={"metrics": folder.manifest.metrics if folder.manifest else {}}, pinned=pinned,
        virtual_tokens=virtual_tokens, prefix=prefix, ia3=ia3, dense=dense,
    )


def _at(tensor: torch.Tensor, home: torch.device, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`tensor` in `dtype` on `home`; pinned when home is the host of a GPU device."""
    moved = tensor.to(device=home, dtype=dtype)
    return moved.pin_memory() if home.type == "cpu" and device.type == "cuda" else moved


def _head(folder: AdapterFolder, device: torch.device, dtype: torch.dtype) -> ClassificationHead:
    head = find_head(folder.extra, folder.labels, device, dtype)
    if head is None:
        raise AdapterMismatchError(
            f"classification adapter has no linear head ({' or '.join(m + '.weight' for m in HEAD_MODULES)} "
            "saved via modules_to_save)"
        )
    return head


def find_head(tensors: dict[str, torch.Tensor], labels: tuple[str, ...], device: torch.device,
              dtype: torch.dtype) -> ClassificationHead | None:
    """The classification head among `tensors` (`classifier.*` or `score.*`), on the serving device and dtype;
    `labels` name its rows when their count fits (else LABEL_i)."""
    for module in HEAD_MODULES:
        weight = tensors.get(f"{module}.weight")
        if weight is not None and weight.dim() == 2:
            bias = tensors.get(f"{module}.bias")
            num_labels = weight.shape[0]
            names = labels if len(labels) == num_labels else tuple(f"LABEL_{i}" for i in range(num_labels))
            return ClassificationHead(
                weight=weight.to(device=device, dtype=dtype),
                bias=bias.to(device=device, dtype=dtype) if bias is not None else None,
                labels=names,
            )
    return None
