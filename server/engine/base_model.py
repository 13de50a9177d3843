"""Load the frozen base once and make it adapter-ready.

A causal LM base serves completions (and decoder-style classification adapters); an encoder base
(BERT and friends) serves classification. Every nn.Linear is wrapped in a LoraLinear so any adapter,
loaded now or later, applies per request without touching the base weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from adapters import BaseSignature, PreparedBase
from adapters.quantized import QuantizedWeights, quantize_model, read_quant_config
from server.engine.backend import Backend
from server.engine.loaded import LoadedAdapter
from server.engine.decoder import LlamaDecoder
from server.engine.fused import fuse_llama_projections
from server.engine.lora_layer import ActiveAdapters, wrap_linears
from server.engine.lora_slots import LoraSlots
from server.engine.quant_base import QuantSummary, check_folder_matches, load_quantized_folder, quantize_base

log = logging.getLogger(__name__)


@dataclass
class BaseModel:
    """The frozen base, its tokenizer and the shared per-row adapter state of its LoRA layers."""

    prepared: PreparedBase
    model: nn.Module  # the task model (`...ForCausalLM` or `...ForSequenceClassification`)
    backbone: nn.Module  # the transformer without its head
    tokenizer: transformers.PreTrainedTokenizerBase
    backend: Backend
    signature: BaseSignature
    active: ActiveAdapters
    can_generate: bool
    quant: QuantSummary | None = None  # set on a quantized base (--quant int8|int4|nf4|fp4)
    # (layer index, "qkv" | "gate_up") -> one matmul for those projections (fused.py), read by the lean decoder
    fused: dict = field(default_factory=dict)

    @functools.cached_property
    def weight_bytes(self) -> int:
        """Bytes of every weight the base holds (quantized matrices counted as stored; oneDNN's packed
        copies of a full-precision base are not counted)."""
        if self.quant is not None:
            return self.quant.weight_bytes
        tensors = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    @property
    def lora_home(self) -> torch.device:
        """Where loaded adapters keep their LoRA weights (the memory tier): host memory when the device
        slots (LoraSlots) are on a GPU, so the tier's adapters cost no device memory, and only slots do;
        the serving device otherwise (on CPU they are the same memory; the loop reference reads them)."""
        device = self.backend.device
        return torch.device("cpu") if device.type != "cpu" and self.active.slots is not None else device

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 512))

    @contextlib.contextmanager
    def adapters_for_rows(self, rows: list[LoadedAdapter | None]) -> Iterator[None]:
        """Within the block, batch row i runs with rows[i]'s LoRA weights (None: the base alone)."""
        self.active.set_rows(rows, self.backend.device)
        try:
            yield
        finally:
            self.active.clear()


LORA_KERNELS = ("stacked", "loop")


def load_base(prepared: PreparedBase, backend: Backend, lora_kernel: str = "stacked", lora_slots: int = 32,
              fuse: bool = True) -> BaseModel:
    """Load, freeze and wrap the base. `lora_kernel`: "stacked" (LoraSlots, the fast path) or "loop"
    (the reference); `lora_slots`: adapters resident on the device at once with the stacked kernel;
    `fuse`: one matmul for q, k, v and for gate, up where the lean decoder runs (fused.py)."""
    if lora_kernel not in LORA_KERNELS:
        raise ValueError(f"lora_kernel must be one of {LORA_KERNELS}")
    config = AutoConfig.from_pretrained(prepared.path)
    can_generate = is_decoder_only(config)
    model_cls = AutoModelForCausalLM if can_generate else AutoModelForSequenceClassification
    quantized_folder = read_quant_config(prepared.path)
    checkpoint: QuantizedWeights | None = None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the unused placeholder head of an encoder is not news
    try:
        if quantized_folder is not None:
            check_folder_matches(quantized_folder, backend.quant, backend.quant_kernels, prepared.path)
            model, checkpoint = load_quantized_folder(prepared.path, model_cls, backend.dtype)
        else:
            model = model_cls.from_pretrained(prepared.path, dtype=backend.dtype)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if quantized_folder is None:  # a quantized folder's tensors stay where they are until they are packed
        model.to(backend.device)
    model.eval().requires_grad_(False)
    signature = BaseSignature.of(model, prepared.name, prepared.fingerprint)
    backbone = getattr(model, model.base_model_prefix)
    slots = None
    if lora_kernel == "stacked":
        slots = LoraSlots(lora_slots, dict(signature.linear_shapes), backend.device, backend.dtype)
    active = ActiveAdapters(slots)
    kernels = backend.quant_kernels
    if kernels is not None and kernels.reads_checkpoints and checkpoint is None:
        checkpoint = quantize_model(model, backend.quant, source_name=prepared.name,
                                    source_fingerprint=prepared.fingerprint)  # before wrapping: HF's module names
    wrapped = wrap_linears(model, active, backend.linear, backend.pack)
    quant = None
    if backend.quant_kernels is not None:
        quant = quantize_base(model, backend.quant_kernels, backend.device, backend.dtype, checkpoint)
        log.info("base quantized: %s, %d matrices, %.1f MB of weights", quant.kernel, quant.matrices,
                 quant.weight_bytes / 1e6)
    fused = {}
    if fuse and LlamaDecoder.supports(model):
        fused = fuse_llama_projections(model, backend.linear, backend.pack)
    tokenizer = AutoTokenizer.from_pretrained(prepared.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info(
        "base %s loaded (%s, %d linear layers adapter-ready, %s on %s, %s LoRA kernel)",
        prepared.name, type(model).__name__, len(wrapped), backend.dtype, backend.device, lora_kernel,
    )
    return BaseModel(
        prepared=prepared, model=model, backbone=backbone, tokenizer=tokenizer, backend=backend,
        signature=signature, active=active, can_generate=can_generate, quant=quant, fused=fused,
    )


def is_decoder_only(config) -> bool:
    """Llama-style bases generate; BERT-style bases (which also have an LM-head class, for masked LM
    checkpoints turned decoder) classify unless their config says they are decoders."""
    if config.is_encoder_decoder or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    return bool(config.is_decoder) or config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


@torch.inference_mode()
def pooled_features(base: BaseModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] token ids -> [B, hidden]: the pooler output where the backbone has one (BERT), else the
    hidden state of the last non-padding token (decoder classification, as HF's ...ForSequenceClassification)."""
    out = base.backbone(input_ids=input_ids, attention_mask=attention_mask)
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled
    last = attention_mask.sum(dim=1) - 1  # right padding: index of each row's last real token
    return out.last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), last]
