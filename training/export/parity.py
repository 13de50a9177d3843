"""The parity report: what an export computes vs the torch reference (base + adapter, unmerged, fp32).

Classification: logits of every parity row from torch and from the export, fed the very same token
arrays (right-padded, cut at the adapter's max_length, in length-sorted batches): max and mean absolute
difference, argmax agreement, accuracy against the gold labels. Completion: greedy decoding of every
parity prompt by torch and by the export: identical sequences, position-wise token agreement, and the max
absolute logit difference over the steps where both had produced the same tokens so far.

Quantized checkpoints (int8 / int4) add teacher-forced figures over held-out real text (heldout_text):
each model's perplexity, the relative change, and next-token agreement, the fraction of positions where
both models' most likely next token is the same (the greedy choice, free of a diverged decode's history).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import math

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from training.export.source import ParityRows

PARITY_BATCH = 32
NEXT_TOKEN_BATCH = 4  # text windows per forward: [4, 256, vocab] fp32 logits stay near 200 MB for SmolLM2
FIGURE_DIGITS = 6
Scorer = Callable[[dict[str, np.ndarray]], np.ndarray]  # token arrays [B, S] -> logits [B, num_labels]


@dataclass(frozen=True)
class Greedy:
    """Greedy decodes of every parity prompt: tokens and the logits [steps, vocab] of each step."""

    tokens: list[list[int]]
    logits: list[np.ndarray]


# -- classification ---------------------------------------------------------------------------------

def class_logits(score: Scorer, tokenizer: PreTrainedTokenizerBase, texts: tuple[str, ...], max_length: int,
                 batch_size: int = PARITY_BATCH) -> np.ndarray:
    """[N, num_labels] logits of `texts`; batches go in length order so little is spent on padding."""
    tokenizer.padding_side = "right"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in chunk], padding=True, truncation=True, max_length=max_length,
                          return_tensors="np")
        logits = score({k: v.astype(np.int64) for k, v in batch.items()})
        if out is None:
            out = np.zeros((len(texts), logits.shape[-1]), dtype=np.float32)
        out[chunk] = logits
    assert out is not None
    return out


def torch_scorer(model: torch.nn.Module) -> Scorer:
    @torch.inference_mode()
    def score(batch: dict[str, np.ndarray]) -> np.ndarray:
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.float().numpy()
    return score


def session_scorer(session) -> Scorer:
    """An onnxruntime InferenceSession of a classification export (feeds only the inputs it declares)."""
    wanted = [i.name for i in session.get_inputs()]

    def score(batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: batch[name] if name in batch else np.zeros_like(batch["input_ids"]) for name in wanted}
        return session.run(["logits"], feed)[0]
    return score


def compare_classification(reference: np.ndarray, got: np.ndarray, gold: tuple[int, ...] | None) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "max_abs_diff": _round(np.abs(got - reference).max()),
        "mean_abs_diff": _round(np.abs(got - reference).mean()),
        "argmax_agreement": _round((got.argmax(-1) == reference.argmax(-1)).mean()),
    }
    if gold is not None:
        accuracy = float((got.argmax(-1) == np.asarray(gold)).mean())
        figures["accuracy"] = _round(accuracy)
        figures["accuracy_delta"] = _round(accuracy - float((reference.argmax(-1) == np.asarray(gold)).mean()))
    return figures


def accuracy(logits: np.ndarray, gold: tuple[int, ...] | None) -> dict[str, Any]:
    return {} if gold is None else {"accuracy": _round((logits.argmax(-1) == np.asarray(gold)).mean())}


# -- completion -------------------------------------------------------------------------------------

@torch.inference_mode()
def greedy(model, prompts: tuple[tuple[int, ...], ...], new_tokens: int, pad_token_id: int) -> Greedy:
    """Greedy decode with HF's `generate` (a torch model or optimum's ORTModelForCausalLM: same loop)."""
    tokens, logits = [], []
    for prompt in prompts:
        input_ids = torch.tensor([prompt])
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
            do_sample=False, num_beams=1, pad_token_id=pad_token_id, output_logits=True,
            return_dict_in_generate=True, temperature=None, top_p=None, top_k=None,
        )
        tokens.append(out.sequences[0, len(prompt):].tolist())
        logits.append(torch.stack([step[0] for step in out.logits]).float().numpy())  # [steps, vocab]
    return Greedy(tokens, logits)


def compare_completion(reference: Greedy, got: Greedy) -> dict[str, Any]:
    identical, agree, total, worst = 0, 0, 0, 0.0
    for ref_tokens, got_tokens, ref_logits, got_logits in zip(reference.tokens, got.tokens, reference.logits,
                                                              got.logits):
        identical += ref_tokens == got_tokens
        total += max(len(ref_tokens), len(got_tokens))
        agree += sum(a == b for a, b in zip(ref_tokens, got_tokens))
        same_prefix = 0  # logits are comparable while both decodes saw the same tokens
        while same_prefix < min(len(ref_tokens), len(got_tokens)) and ref_tokens[same_prefix] == got_tokens[same_prefix]:
            same_prefix += 1
        steps = min(same_prefix + 1, len(ref_logits), len(got_logits))
        if steps:
            worst = max(worst, float(np.abs(ref_logits[:steps] - got_logits[:steps]).max()))
    return {
        "greedy_identical": f"{identical}/{len(reference.tokens)}",
        "all_greedy_identical": identical == len(reference.tokens),
        "token_agreement": _round(agree / max(total, 1)),
        "logits_max_abs_diff": _round(worst),
    }


@dataclass(frozen=True)
class NextTokens:
    """A model's teacher-forced predictions over text windows: every position but each window's last."""

    nll: float  # summed negative log-likelihood of each window's tokens after its first
    predicted: np.ndarray  # [positions] the argmax next token at each position, windows concatenated

    @property
    def count(self) -> int:
        return int(self.predicted.size)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(self.count, 1))


@torch.inference_mode()
def next_tokens(model: torch.nn.Module, windows: tuple[tuple[int, ...], ...],
                batch_size: int = NEXT_TOKEN_BATCH) -> NextTokens:
    """Score `windows` (equal-length token id tuples, no padding) with a causal LM, teacher-forced."""
    nll, predicted = 0.0, []
    for start in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[start:start + batch_size])  # [B, W]
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].float()  # [B, W-1, V]
        targets = ids[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        predicted.append(logits.argmax(-1).flatten().numpy())
    return NextTokens(nll, np.concatenate(predicted) if predicted else np.zeros(0, dtype=np.int64))


def compare_next_tokens(reference: NextTokens, got: NextTokens) -> dict[str, Any]:
    """Perplexity of both, its relative change (got / reference - 1), next-token agreement."""
    return {
        "tokens": reference.count,
        "reference_perplexity": _round(reference.perplexity),
        "perplexity": _round(got.perplexity),
        "perplexity_change": _round(got.perplexity / reference.perplexity - 1.0),
        "next_token_agreement": _round((reference.predicted == got.predicted).mean()),
    }


HEADLINE_PARTS = ("merged_torch", "onnx_fp32", "onnx_int8", "int8", "int4")  # a report's compared exports
HEADLINE_KEYS = ("max_abs_diff", "argmax_agreement", "accuracy", "accuracy_delta", "greedy_identical",
                 "token_agreement", "logits_max_abs_diff", "perplexity", "perplexity_change", "next_token_agreement",
                 "adapter_delta_kept")


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures worth a glance in the manifest (parity.json keeps the whole report)."""
    figures = {k: report[k] for k in ("source", "rows", "prompts") if k in report}
    for part in HEADLINE_PARTS:
        if part in report:
            figures[part] = {k: v for k, v in report[part].items() if k in HEADLINE_KEYS}
    return figures


def rows_summary(rows: ParityRows) -> dict[str, Any]:
    if rows.prompts:
        return {"source": rows.source, "prompts": len(rows.prompts)}
    return {"source": rows.source, "rows": len(rows.texts)}


def round_figure(value: float) -> float:
    """A figure as the reports print it (FIGURE_DIGITS significant digits)."""
    return float(f"{float(value):.{FIGURE_DIGITS}g}")


_round = round_figure
