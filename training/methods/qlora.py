"""QLoRA: LoRA over a frozen base whose linear layers are stored in 4 bits (bitsandbytes NF4 or FP4).

The base arrives in fp32; `quantize_linears` swaps every linear of the backbone (not the LM or
classification head, which stay fp32: the LM head is tied to the embeddings, the classification head
trains) for a bitsandbytes `Linear4bit` holding the same weights in 4 bits, then LoRA goes on top as in
`lora.py`. On CPU this saves memory, not time (measured when bitsandbytes was pinned: nf4 is slower than fp32 there).

On CUDA the linears are quantized onto the GPU as they move there (`quantize_linears(device=...)`) and the
matmuls run under the run's autocast (bf16 by default there) over weights dequantized per call; COMPUTE_DTYPE
stays fp32 so a forward without autocast (evaluation) computes in fp32 on either device.

The folder is a plain PEFT LoRA folder: the 4-bit base is rebuilt from the base on reload, never saved.
Serving it on the fp32 base (the server's default) is QLoRA's usual deployment; its outputs then
differ slightly from training's, which saw the 4-bit weights. Figures measured during training (the
manifest's) are the 4-bit ones; `reload` rebuilds that exact base.

bitsandbytes on a CPU with AVX512-BF16 repacks the weights for a faster bf16 kernel the first time an eval
forward runs without gradients; that kernel's results differ from the training kernel's by ~1e-3, so it is
switched off here: training, evaluation and a reload all compute the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel

from training.config import TrainConfig
from training.device import BNB_INSTALL_HINT, resolve_device
from training.errors import ConfigError
from training.methods import lora
from training.methods.peft_io import reload_peft

COMPUTE_DTYPE = torch.float32  # the dtype of the matmul after dequantisation: the CPU's fast dtype


def quantize_linears(model: PreTrainedModel, quant_type: str = "nf4", device: torch.device | None = None) -> int:
    """Replace every nn.Linear of model's backbone by a 4-bit Linear4bit in place, on `device` (default: where
    each linear is); returns how many.

    bitsandbytes quantizes a weight as it moves to a device, so a base loaded on the CPU goes to a GPU as 4-bit
    linears, one at a time: the GPU never holds the fp32 backbone (QLoRA's point: a base that only fits there
    in 4 bits). The embeddings, norms and heads are the caller's to move (training.methods moves the model)."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ConfigError(f"qlora needs bitsandbytes ({BNB_INSTALL_HINT}): {exc}") from exc
    backbone = model.base_model  # LlamaModel / BertModel: every block, not the task head
    replaced = 0
    for parent in list(backbone.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=COMPUTE_DTYPE, quant_type=quant_type)
            quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type=quant_type)
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
            quantized = quantized.to(device or child.weight.device)  # Params4bit quantises on this move
            quantized.support_avx512bf16_for_cpu = False  # one kernel for train and eval (module docstring)
            setattr(parent, child_name, quantized)
            replaced += 1
    if not replaced:
        raise ConfigError("qlora found no linear layers to quantize in this base")
    return replaced


def prepare(model: PreTrainedModel, config: TrainConfig, task: str, base_name: str) -> PeftModel:
    """LoRA over the base with its backbone's linears quantized onto config.device (the LoRA weights are made
    on the CPU, as lora's, then follow their base layer)."""
    lora.check_linear_targets(model, config.target_modules, base_name)
    quantize_linears(model, config.qlora_quant_type, resolve_device(config.device))
    return lora.prepare(model, config, task, base_name)


def reload(model: PreTrainedModel, folder: Path, device: torch.device | None = None) -> PeftModel:
    """The 4-bit base rebuilt exactly as training built it (quantized onto `device`), then the LoRA folder on top."""
    from adapters import read_manifest

    manifest = read_manifest(folder)
    quant_type = (manifest.train_config.get("qlora_quant_type") if manifest else None) or "nf4"
    quantize_linears(model, quant_type, device)
    return reload_peft(model, folder)
