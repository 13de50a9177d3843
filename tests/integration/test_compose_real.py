"""On the real SmolLM2 base, with the two shipped chatbot adapters: a per-request combination equals their
`training merge --method cat` folder served as one adapter, in one mixed batch, prefill and decode."""

from __future__ import annotations

import torch

from adapters import read_adapter_folder, validate_against_base
from server.engine.loaded import Combination, load_adapter
from tests.integration.conftest import CPU_FP32, example_adapters
from training.merge import MergeOptions, MergeParent, merge_adapters

WEIGHTS = (0.6, 0.4)
# fp32 logits of magnitude ~20 after 30 layers, the same terms summed in other orders: 3.6e-5 measured
ATOL = 1e-4


def _load(folder, base, name):
    parsed = read_adapter_folder(folder)
    validate_against_base(parsed, base.signature)
    return load_adapter(name, 1, parsed, CPU_FP32.device, CPU_FP32.dtype)


@torch.no_grad()
def test_combination_equals_the_cat_merge_on_smollm2(tmp_path, smollm2, cache_dir):
    chatbots = example_adapters("completion")
    tech, trivia = chatbots["chatbot-tech"], chatbots["chatbot-trivia"]
    merged_dir = tmp_path / "tech-trivia"
    merge_parents = (MergeParent(tech, WEIGHTS[0]), MergeParent(trivia, WEIGHTS[1]))
    merge_adapters(MergeOptions(out=merged_dir, parents=merge_parents, method="cat", cache_dir=cache_dir))
    parents = _load(tech, smollm2, "tech"), _load(trivia, smollm2, "trivia")
    merged = _load(merged_dir, smollm2, "merged")
    combo = Combination(tuple(zip(parents, WEIGHTS)))
    rows = [combo, merged, parents[0], None]
    prompt = smollm2.tokenizer("How do I reset my router?", return_tensors="pt")["input_ids"]
    for ids in (prompt, prompt[:, -1:]):  # prefill runs, then a one-token (decode-kernel) step
        with smollm2.adapters_for_rows(rows):
            logits = smollm2.model(input_ids=ids.expand(len(rows), -1)).logits[:, -1]
        torch.testing.assert_close(logits[0], logits[1], atol=ATOL, rtol=0)
        assert (logits[0] - logits[2]).abs().max() > 1e-2 and (logits[0] - logits[3]).abs().max() > 1e-2
