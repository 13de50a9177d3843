"""The lean Llama forward vs HF's own backbone (the reference), with the same cache and mixed adapters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from adapters import read_adapter_folder
from server.engine.batch_runner import BatchRunner, RowInput
from server.engine.decoder import HFDecoder, LlamaDecoder, grouped_attention
from server.engine.loaded import load_adapter
from tests.server.conftest import CPU_FP32


@pytest.mark.parametrize("heads,kv_heads,seq", [(4, 2, 1), (4, 2, 5), (6, 2, 3), (4, 4, 4), (9, 3, 1)])
def test_grouped_attention_equals_repeat_kv(heads, kv_heads, seq):
    gen = torch.Generator().manual_seed(heads * 100 + seq)
    batch, keys, dim = 3, 7, 8
    q = torch.randn(batch, heads, seq, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, keys, dim, generator=gen) for _ in range(2))
    visible = torch.rand(batch, 1, seq, keys, generator=gen) > 0.3
    visible[..., 0] = True  # every query sees at least one key
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    rep = heads // kv_heads
    expected = F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), attn_mask=mask, scale=0.3)
    got = grouped_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(batch, seq, heads * dim), atol=1e-6, rtol=1e-5)


def test_lean_llama_equals_hf_backbone_with_mixed_adapters(tiny_llama_base, tiny_adapters):
    base = tiny_llama_base
    lean, reference = BatchRunner(base, 4, 64), BatchRunner(base, 4, 64, lean=False)
    assert isinstance(lean.decoder, LlamaDecoder) and isinstance(reference.decoder, HFDecoder)
    alpha, beta = (load_adapter(n, 1, read_adapter_folder(p), CPU_FP32.device, CPU_FP32.dtype)
                   for n, p in tiny_adapters.items())
    tok = base.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("Once upon a time there", "The capital of France is", "Hi")]
    # prefill rows of different lengths in slots out of order, then decode steps at different positions
    steps = [
        [RowInput(2, 0, prompts[0], alpha), RowInput(0, 0, prompts[1], None), RowInput(1, 0, prompts[2], beta)],
        [RowInput(2, len(prompts[0]), [42], alpha), RowInput(0, len(prompts[1]), [7], None),
         RowInput(1, len(prompts[2]), [99], beta)],
        [RowInput(1, len(prompts[2]) + 1, [5], beta), RowInput(2, len(prompts[0]) + 1, [11], alpha)],
        [RowInput(3, 0, prompts[1], beta), RowInput(0, len(prompts[1]) + 1, [13], alpha)],
    ]
    for rows in steps:
        torch.testing.assert_close(lean.forward(rows), reference.forward(rows), atol=1e-5, rtol=1e-5)
    for layer in range(len(lean.cache.keys)):  # both wrote the same keys and values
        torch.testing.assert_close(lean.cache.keys[layer], reference.cache.keys[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lean.cache.values[layer], reference.cache.values[layer], atol=1e-5, rtol=1e-5)


def test_other_architectures_take_the_hf_backbone(tiny_bert_base):
    from server.engine.decoder import make_decoder

    assert isinstance(make_decoder(tiny_bert_base.model), HFDecoder)


def _cuda_layout(sdpa):
    """SDPA with its output in the transposed memory layout CUDA's fused kernels return: same values,
    strides of a [B, S, heads, d] tensor."""
    def attention(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    return attention


@pytest.mark.parametrize("heads,kv_heads,seq", [(9, 3, 1), (9, 3, 4), (4, 4, 2)])
def test_grouped_attention_takes_transposed_attention_outputs(monkeypatch, heads, kv_heads, seq):
    gen = torch.Generator().manual_seed(seq)
    q = torch.randn(2, heads, seq, 8, generator=gen)
    k, v = (torch.randn(2, kv_heads, 5, 8, generator=gen) for _ in range(2))
    mask = torch.zeros(2, 1, seq, 5)
    expected = grouped_attention(q, k, v, mask, 0.3)
    monkeypatch.setattr("server.engine.decoder.F.scaled_dot_product_attention",
                        _cuda_layout(F.scaled_dot_product_attention))
    torch.testing.assert_close(grouped_attention(q, k, v, mask, 0.3), expected, atol=0, rtol=0)


def test_lean_forward_with_cuda_layout_attention_equals_the_reference(monkeypatch, tiny_llama_base, tiny_adapters):
    """The engine's step on a grouped-KV base when attention answers in CUDA's layout (it used to raise
    'view size is not compatible with input tensor's size and stride' on every request)."""
    base = tiny_llama_base
    assert base.model.config.num_key_value_heads < base.model.config.num_attention_heads
    reference = BatchRunner(base, 2, 32, lean=False)
    lean = BatchRunner(base, 2, 32)
    alpha = load_adapter("a", 1, read_adapter_folder(next(iter(tiny_adapters.values()))), CPU_FP32.device,
                         CPU_FP32.dtype)
    prompt = base.tokenizer("Once upon a time there")["input_ids"]
    steps = [[RowInput(0, 0, prompt, alpha), RowInput(1, 0, prompt[:3], None)],
             [RowInput(0, len(prompt), [42], alpha), RowInput(1, 3, [7], None)]]
    expected = [reference.forward(rows) for rows in steps]
    monkeypatch.setattr("server.engine.decoder.F.scaled_dot_product_attention",
                        _cuda_layout(F.scaled_dot_product_attention))
    for rows, want in zip(steps, expected):
        torch.testing.assert_close(lean.forward(rows), want, atol=1e-5, rtol=1e-5)
