"""Completion rows -> token ids with the loss on the answer only, and right-padded batches.

Chat rows are rendered exactly as the server renders a chat request:
`apply_chat_template(messages, add_generation_prompt=True, tokenize=True)` gives the prompt tokens; the
answer tokens follow, then the template's end-of-turn token(s) (`<|im_end|>` for SmolLM2), so the model
learns to stop. Labels are IGNORE_INDEX on every prompt and padding token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedTokenizerBase

from training.data import CompletionExample
from training.errors import ConfigError

IGNORE_INDEX = -100  # what torch's cross_entropy (and HF's loss) skip
PROBE_ANSWER = "Loraplex probe answer."


@dataclass(frozen=True)
class EncodedCompletion:
    input_ids: tuple[int, ...]  # [S] prompt then answer then end-of-turn
    labels: tuple[int, ...]  # [S] IGNORE_INDEX over the prompt, the token ids over answer + end-of-turn

    @property
    def answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def turn_end_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The tokens the chat template writes right after an assistant answer (`<|im_end|>`), found by
    rendering a probe turn; the tokenizer's EOS if the template does not show it plainly."""
    if tokenizer.chat_template is not None:
        question = [{"role": "user", "content": "Hello"}]
        prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(question + [{"role": "assistant", "content": PROBE_ANSWER}], tokenize=False)
        if full.startswith(prompt + PROBE_ANSWER):
            end = full[len(prompt) + len(PROBE_ANSWER):].rstrip()
            if end:
                return tuple(tokenizer(end, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ConfigError("the base tokenizer has neither a chat template end-of-turn nor an EOS token")
    return (tokenizer.eos_token_id,)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, example: CompletionExample) -> list[int]:
    """The prompt as the server tokenizes it: chat template for chat rows, plain encoding for raw prompts."""
    if not example.messages:
        return list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
    if tokenizer.chat_template is None:
        raise ConfigError("chat rows need a base whose tokenizer has a chat template; use prompt/completion rows")
    messages = [asdict(turn) for turn in example.messages]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, example: CompletionExample, max_length: int, end_ids: tuple[int, ...]
) -> EncodedCompletion | None:
    """Prompt + answer + end, cut on the right to max_length; None if no answer token survives the cut."""
    prompt = prompt_ids(tokenizer, example)
    ending = end_ids if example.messages else (tokenizer.eos_token_id,)
    answer = list(tokenizer(example.answer, add_special_tokens=False)["input_ids"]) + list(ending)
    input_ids = (prompt + answer)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        return None
    return EncodedCompletion(tuple(input_ids), tuple(labels))


def encode_all(
    tokenizer: PreTrainedTokenizerBase, examples: tuple[CompletionExample, ...], max_length: int
) -> tuple[list[EncodedCompletion], int]:
    """Encode every row; returns (encoded rows, number skipped because the prompt alone filled max_length)."""
    end_ids = turn_end_ids(tokenizer)
    encoded = [encode_completion(tokenizer, ex, max_length, end_ids) for ex in examples]
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)


def collate(rows: list[EncodedCompletion], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids, attention_mask and labels, each [B, S]."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
