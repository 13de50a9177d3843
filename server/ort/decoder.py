"""Drive one exported causal-LM graph (optimum's text-generation-with-past) a step at a time.

The graph takes input_ids [1, S], attention_mask [1, P + S], position_ids [1, S] and
past_key_values.{i}.key/value [1, kv_heads, P, head_dim], and returns logits [1, S, vocab] and
present.{i}.key/value [1, kv_heads, P + S, head_dim]. A prefill is the same graph with P = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adapters import AdapterFormatError

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
REQUIRED_INPUTS = ("input_ids", "attention_mask")
ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class KVCache:
    """One request's cache: name -> [1, kv_heads, length, head_dim], and its length."""

    tensors: dict[str, np.ndarray]
    length: int = 0


class OrtCausalLM:
    def __init__(self, session) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        missing = [n for n in REQUIRED_INPUTS if n not in inputs] + ([] if "logits" in outputs else ["logits"])
        self.past_names = sorted(n for n in inputs if n.startswith(PAST_PREFIX))
        if missing or not self.past_names:
            raise AdapterFormatError(
                "the ONNX graph is not a causal LM with a KV cache (export it with `training export`, which uses "
                f"optimum's text-generation-with-past); missing: {missing or ['past_key_values.*']}"
            )
        self.session = session
        self.present_names = [PRESENT_PREFIX + n[len(PAST_PREFIX):] for n in self.past_names]
        self.has_position_ids = "position_ids" in inputs
        self._empty = {}
        for name in self.past_names:
            _, heads, _, head_dim = inputs[name].shape  # [batch, kv_heads, past, head_dim]
            dtype = ORT_FLOAT_TYPES.get(inputs[name].type, np.float32)
            self._empty[name] = np.zeros((1, int(heads), 0, int(head_dim)), dtype=dtype)

    def empty_cache(self) -> KVCache:
        return KVCache(dict(self._empty))

    def forward(self, tokens: list[int], cache: KVCache) -> np.ndarray:
        """Run `tokens` after the cached ones; returns the last position's logits [vocab] and grows `cache`."""
        n = len(tokens)
        feed = {
            "input_ids": np.asarray([tokens], dtype=np.int64),
            "attention_mask": np.ones((1, cache.length + n), dtype=np.int64),
            **cache.tensors,
        }
        if self.has_position_ids:
            feed["position_ids"] = np.arange(cache.length, cache.length + n, dtype=np.int64)[None, :]
        results = self.session.run(["logits", *self.present_names], feed)
        cache.tensors = dict(zip(self.past_names, results[1:]))
        cache.length += n
        return results[0][0, -1]
