"""`training export --format int8|int4`: a quantized base checkpoint, the adapter merged in first or, with
`--base-only`, the base alone, plus its parity report.

The folder holds config.json (+ generation_config.json) and the tokenizer as a merged export writes them,
then `quantized.safetensors` + `quantization.json` (adapters.quantized.save_quantized): the plain tensors
under the state-dict keys of the model class a server builds from config.json (AutoModelForCausalLM for a
decoder base, AutoModelForSequenceClassification for an encoder), the quantized matrices by module name.
Which module gets which quantization is adapters.quantized.plan_model's decision (a classification head stays
plain).

Parity: the reference is the unquantized model (merged, or the base) in fp32; the quantized side is a copy
of it with `dequantized_state_dict` loaded, the slow, obviously-correct reading of the stored weights that
every runtime kernel is tested against. Completion: perplexity of both on held-out real text, next-token
agreement (teacher-forced, heldout_text) and greedy decodes of the parity prompts; classification: logits of
the adapter's held-out rows. A merged export also reports `adapter_delta_kept`: how much of the adapter's
weight change survives quantization (the projection of quantized - base onto merged - base over every
adapted matrix; 1 kept, 0 erased). Rounding the merged weights can snap a change smaller than half a
quantization step back to the base's value, most of all on a base whose weights already lie on a 4-bit grid
(smollm2-135m is prepared from a Q4_1 GGUF); then `--base-only` with the adapter served on top keeps it whole.

A base-only export of an encoder holds no classification head. transformers gives an encoder loaded as a
classifier a placeholder head initialised at random; saved, it would read as a trained one (a server takes a
classification export's head from its folder). A classification adapter brings its own head; the parity
figures of such an export compare the base's features through one seeded placeholder head, with no accuracy.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from adapters import ExportManifest, atomic_directory, write_export_manifest
from adapters.dense import HEAD_MODULES
from adapters.export_manifest import PARITY_FILE
from adapters.quantized import (QUANT_WEIGHTS_FILE, QuantizedWeights, dequantized_state_dict, quantize_model,
                                save_quantized, weight_bytes)
from training.errors import TrainingError
from training.export import parity
from training.export.heldout_text import held_out_text, training_texts
from training.export.merged import merge, save_model_files
from training.export.onnx_export import package_versions
from training.export.options import ExportOptions
from training.export.source import ExportSource
from training.models import is_causal_lm, load_causal_lm, load_sequence_classifier

log = logging.getLogger(__name__)

PLACEHOLDER_HEAD_SEED = 0  # base-only encoder: the in-memory head the parity figures read through
PLACEHOLDER_LABELS = ("LABEL_0", "LABEL_1")  # transformers' default two-label head
REFERENCE = "torch fp32: the {what}, unquantized"
PEFT_PREFIX = "base_model.model."  # a PEFT model's module names over the merged model's
QUANTIZED = "torch fp32: the same model with adapters.quantized.dequantized_state_dict of the stored {method} weights"


def export_quantized(source: ExportSource, options: ExportOptions) -> tuple[ExportManifest, dict[str, Any]]:
    """Write the int8 / int4 export `options` asks for; returns (its manifest, its parity report)."""
    method, adapter_name = options.format, source.folder.path.resolve().name
    adapted = {} if options.base_only else adapted_base_weights(source.model)
    model, task, labels = _model_to_quantize(source, options)
    weights = quantize_model(model, method, source_name=source.base.name, source_fingerprint=source.base.fingerprint,
                             merged_adapter="" if options.base_only else adapter_name)
    report = _report(source, options, model, dequantized_copy(model, weights), task)
    if adapted:
        report[method]["adapter_delta_kept"] = adapter_delta_kept(adapted, model, weights)
    with atomic_directory(options.out) as tmp:
        save_model_files(model, source.tokenizer, labels, tmp)
        if options.base_only and task == "classification":
            _drop_head(model)
        save_quantized(tmp, model, weights)
        (tmp / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
        manifest = write_export_manifest(tmp, ExportManifest(
            format=method, task=task, base_name=source.base.name, base_fingerprint=source.base.fingerprint,
            adapter_name="" if options.base_only else adapter_name,
            adapter_digest="" if options.base_only else source.digest(),
            adapter_rank=0 if options.base_only else source.rank, quantize=method, labels=labels,
            model_file=QUANT_WEIGHTS_FILE, settings=_settings(source, options, model, weights),
            parity=parity.headline(report),
        ))
    log.info("%s export written to %s", method, options.out)
    return manifest, report


def dequantized_copy(model: nn.Module, weights: QuantizedWeights) -> nn.Module:
    """A copy of `model` computing with the matrices the quantized checkpoint stands for."""
    quantized = copy.deepcopy(model)
    result = quantized.load_state_dict(dequantized_state_dict(weights), strict=False)
    if result.unexpected_keys:
        raise TrainingError(f"quantized weights name no parameter of the model: {result.unexpected_keys[:3]}")
    return quantized.eval()


def adapted_base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weight of every module a PEFT adapter changes, by its name in the merged model (a copy:
    merging writes into them). Empty for a freeze or full model (no base weights beside the trained ones)."""
    if not isinstance(model, PeftModel):
        return {}
    return {name.removeprefix(PEFT_PREFIX): module.get_base_layer().weight.detach().clone()
            for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer) and hasattr(module.get_base_layer(), "weight")}


def adapter_delta_kept(base_weights: dict[str, torch.Tensor], merged: nn.Module, weights: QuantizedWeights) -> float:
    """<Q - B, M - B> / |M - B|^2 summed over the adapted matrices that were quantized (B base, M merged,
    Q the dequantized weight): 1 when quantization keeps the adapter's change, 0 when it erases it."""
    dequantized = dequantized_state_dict(weights)
    along, norm = 0.0, 0.0
    for name, base in base_weights.items():
        key = f"{name}.weight"
        if key not in dequantized:
            continue
        delta = merged.get_submodule(name).weight.detach().float() - base.float()
        along += float(((dequantized[key] - base.float()) * delta).sum())
        norm += float(delta.pow(2).sum())
    return parity.round_figure(along / norm) if norm else 1.0


def _model_to_quantize(source: ExportSource, options: ExportOptions) -> tuple[PreTrainedModel, str, tuple[str, ...]]:
    """(the fp32 model to quantize, its task, its labels): the adapter merged, or the base as a server loads it."""
    if not options.base_only:
        return merge(source.model), source.task, source.labels
    source.model = None  # the adapter is not needed: free it before the base loads again
    if is_causal_lm(source.base.path):
        return load_causal_lm(source.base).eval(), "completion", ()
    torch.manual_seed(PLACEHOLDER_HEAD_SEED)
    model = load_sequence_classifier(source.base, PLACEHOLDER_LABELS, source.tokenizer.pad_token_id)
    return model.eval(), "classification", ()


def _report(source: ExportSource, options: ExportOptions, reference: nn.Module, quantized: nn.Module,
            task: str) -> dict[str, Any]:
    what = "base alone" if options.base_only else "base with the adapter merged in"
    report: dict[str, Any] = {"task": task, "method": source.folder.method, "base_only": options.base_only,
                              "reference": REFERENCE.format(what=what),
                              "quantized": QUANTIZED.format(method=options.format)}
    rows = source.rows
    if task == "classification":
        gold = None if options.base_only else rows.gold
        report.update(parity.rows_summary(rows), max_length=source.max_length)
        if options.base_only:
            report["head"] = f"placeholder (seed {PLACEHOLDER_HEAD_SEED}): a base-only export holds no head"
        ref_logits, got_logits = (parity.class_logits(parity.torch_scorer(m), source.tokenizer, rows.texts,
                                                      source.max_length) for m in (reference, quantized))
        report["torch"] = parity.accuracy(ref_logits, gold)
        report[options.format] = parity.compare_classification(ref_logits, got_logits, gold)
        return report
    text = held_out_text(source.tokenizer, options.perplexity_tokens,
                         frozenset() if options.base_only else training_texts(source))
    report["text"] = text.source
    figures = parity.compare_next_tokens(parity.next_tokens(reference, text.windows),
                                         parity.next_tokens(quantized, text.windows))
    if rows.prompts:
        report.update(parity.rows_summary(rows), new_tokens=options.parity_tokens)
        pad = source.tokenizer.pad_token_id
        figures.update(parity.compare_completion(parity.greedy(reference, rows.prompts, options.parity_tokens, pad),
                                                 parity.greedy(quantized, rows.prompts, options.parity_tokens, pad)))
    report[options.format] = figures
    return report


def _settings(source: ExportSource, options: ExportOptions, model: nn.Module,
              weights: QuantizedWeights) -> dict[str, Any]:
    config = weights.config
    kinds = Counter(config.modules.values())
    quantized_names = {f"{name}.weight" for name in (*config.modules, *config.tied)}
    plain = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in quantized_names)
    settings: dict[str, Any] = {
        "versions": package_versions(), "base_only": options.base_only, "group_size": config.group_size,
        "modules": dict(sorted(kinds.items())), "tied": len(config.tied),
        "quantized_bytes": weight_bytes(weights.tensors), "plain_bytes": plain,
    }
    if not options.base_only:
        settings["adapter_method"] = source.folder.method
    return settings


def _drop_head(model: nn.Module) -> None:
    """Unregister the classification head, so the plain part of the checkpoint leaves it out."""
    for name in HEAD_MODULES:
        if isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, None)

