"""Fused q/k/v and gate/up matmuls (fused.py) against the same base unfused, with every per-row method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine.base_model import load_base
from server.engine.batch_runner import BatchRunner, RowInput
from server.engine.fused import FusedLinear
from server.engine.merge_mode import Merger
from tests.server.conftest import CPU_FP32, _prepared, load_folder, make_causal_adapter
from tests.server.test_freeze import make_freeze
from tests.server.test_ia3 import make_ia3


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_llama_dir, tiny_adapters) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fused")
    return {
        **tiny_adapters,
        "ia3-out": make_ia3(tiny_llama_dir, root / "ia3-out", 41),  # k, v scaled on their outputs: fused members
        "ia3-up-in": make_ia3(tiny_llama_dir, root / "ia3-up-in", 42, target_modules=["up_proj", "q_proj"],
                              feedforward_modules=["up_proj"]),  # up's INPUT scaled: that batch runs members alone
        "freeze": make_freeze(tiny_llama_dir, root / "freeze", 43, ["model.layers.0.mlp.gate_proj",
                                                                     "model.layers.1.self_attn.k_proj"]),
    }


def _logits(base, folders: dict[str, Path], names: list[str | None]) -> list[torch.Tensor]:
    adapters = {n: load_folder(folders[n], base, n) for n in set(names) - {None}}
    rows = [adapters.get(n) if n else None for n in names]
    runner = BatchRunner(base, len(rows), 64)
    prompt = base.tokenizer("Once upon a time there was")["input_ids"]
    out = [runner.forward([RowInput(i, 0, prompt[: 3 + i], a) for i, a in enumerate(rows)])]
    for step in range(3):
        out.append(runner.forward([RowInput(i, 3 + i + step, [5 + step], a) for i, a in enumerate(rows)]))
    return out


@pytest.mark.parametrize("names", [
    [None, None, None],
    ["alpha", "beta", None, "alpha"],
    ["ia3-out", "freeze", "beta", None],
    ["ia3-up-in", "alpha", None],
])
def test_fused_equals_unfused(tiny_llama_dir, folders, names):
    fused = load_base(_prepared(tiny_llama_dir), CPU_FP32)
    plain = load_base(_prepared(tiny_llama_dir), CPU_FP32, fuse=False)
    assert len(fused.fused) == 2 * fused.model.config.num_hidden_layers and not plain.fused
    assert all(isinstance(f, FusedLinear) for f in fused.fused.values())
    for got, want in zip(_logits(fused, folders, names), _logits(plain, folders, names)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merge_repacks_the_fused_weights(tiny_llama_dir, folders):
    """A merged adapter changes the fused matmul (members' repack repacks it); the swap back restores it."""
    fused = load_base(_prepared(tiny_llama_dir), CPU_FP32)
    plain = load_base(_prepared(tiny_llama_dir), CPU_FP32, fuse=False)
    want = _logits(plain, folders, ["beta", "beta"])
    base_only = _logits(fused, folders, [None, None])
    merger = Merger(fused)
    merger.switch_to(load_folder(folders["beta"], fused, "beta"))
    for got, expected in zip(_logits(fused, folders, [None, None]), want):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    merger.switch_to(None)
    for got, expected in zip(_logits(fused, folders, [None, None]), base_only):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_unpacked_fusion_shares_the_members_memory(tiny_llama_dir, folders):
    """With F.linear (no packed copies: a GPU, bf16 on CPUs without bf16 oneDNN) the members' weights are
    views of the fused matrix: no extra bytes, and a merge into a member is seen by the fused matmul."""
    from server.engine.backend import Backend
    import torch.nn.functional as F

    backend = Backend(torch.device("cpu"), torch.float32, linear=F.linear)
    fused = load_base(_prepared(tiny_llama_dir), backend)
    plain = load_base(_prepared(tiny_llama_dir), backend, fuse=False)
    for projection in fused.fused.values():
        storage = projection.weight.untyped_storage().data_ptr()
        assert all(m.base.weight.untyped_storage().data_ptr() == storage for m in projection.members)
    for got, want in zip(_logits(fused, folders, ["alpha", None]), _logits(plain, folders, ["alpha", None])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want = _logits(plain, folders, ["beta", "beta"])
    Merger(fused).switch_to(load_folder(folders["beta"], fused, "beta"))
    for got, expected in zip(_logits(fused, folders, [None, None]), want):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)



@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tiny_llama_dir) -> tuple[Path, dict[str, Path]]:
    """The tiny Llama, wide enough (k/v 64 rows) that every projection takes the group kernels, and
    every per-row method's adapters on it: the quantized fusion stacks matrices of one kind only."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("wide-llama")
    LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    root = tmp_path_factory.mktemp("wide-adapters")
    return folder, {
        "alpha": make_causal_adapter(folder, root / "alpha", 1, 4, ["q_proj", "v_proj", "up_proj"]),
        "beta": make_causal_adapter(folder, root / "beta", 2, 8, ["k_proj", "gate_proj", "down_proj"]),
        "ia3-out": make_ia3(folder, root / "ia3-out", 41),
        "ia3-up-in": make_ia3(folder, root / "ia3-up-in", 42, target_modules=["up_proj", "q_proj"],
                              feedforward_modules=["up_proj"]),
        "freeze": make_freeze(folder, root / "freeze", 43, ["model.layers.0.mlp.gate_proj",
                                                           "model.layers.1.self_attn.k_proj"]),
    }


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("names", [
    [None, None, None],
    ["alpha", "ia3-out", "freeze", None],
    ["ia3-up-in", "beta", None],
])
def test_quantized_fusion_equals_the_unfused_quantized_base(wide_llama, quant, names):
    """On the native int8/int4 kernels q, k, v (and gate, up) run as one stacked matrix whose rows are
    the members' own: every per-row method gives the unfused quantized base's logits, and the members
    hold views of the fused tensors (no extra bytes)."""
    from server.engine.backend import choose_backend
    from server.engine.native import qgemm_library
    from server.engine.quant_native import stackable

    if qgemm_library() is None:
        pytest.skip("the native CPU kernels do not build here (no C++ compiler or no AVX2): nothing to stack")
    folder, adapters = wide_llama
    backend = choose_backend("cpu", "float32", quant)
    fused = load_base(_prepared(folder), backend, lora_slots=4)
    plain = load_base(_prepared(folder), backend, lora_slots=4, fuse=False)
    assert len(fused.fused) == 2 * fused.model.config.num_hidden_layers and not plain.fused
    for projection in fused.fused.values():
        matrices = [m.kernel_weight for m in projection.members]
        assert stackable(matrices) and projection.weight.out_features == sum(m.out_features for m in matrices)
        for name in projection.weight.ROW_TENSORS:
            storage = getattr(projection.weight, name).untyped_storage().data_ptr()
            assert all(getattr(m, name).untyped_storage().data_ptr() == storage for m in matrices)
    assert fused.weight_bytes == plain.weight_bytes
    for got, want in zip(_logits(fused, adapters, names), _logits(plain, adapters, names)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

def test_matrices_of_different_kinds_or_groups_are_not_stacked():
    from server.engine.native import qgemm_library
    from server.engine.quant_native import NativeInt4, NativeInt8, fuse_rows, stackable
    from adapters.quantized import quantize_int4, quantize_int8

    lib = qgemm_library()
    if lib is None:
        pytest.skip("the native CPU kernels do not build here (no C++ compiler or no AVX2)")
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    int8 = quantize_int8(weight, 64)
    int4 = quantize_int4(weight, 32)
    a = NativeInt8(lib, int8["qweight"], int8["scales"], int8["mins"], 64)
    b = NativeInt4(lib, int4["qweight"], int4["scales"], int4["mins"], 32)
    coarse = quantize_int8(weight, 128)
    c = NativeInt8(lib, coarse["qweight"], coarse["scales"], coarse["mins"], 128)
    assert not stackable([a, b]) and not stackable([a, c]) and stackable([a, a])
    with pytest.raises(ValueError, match="cannot share one kernel call"):
        fuse_rows([a, b])
    x = torch.randn(3, 128)
    expected = torch.cat([a.matmul(x, None), a.matmul(x, None)], dim=-1)
    second = NativeInt8(lib, int8["qweight"], int8["scales"], int8["mins"], 64)
    fused = fuse_rows([a, second])
    torch.testing.assert_close(fused.matmul(x, None), expected, atol=0, rtol=0)
    torch.testing.assert_close(a.matmul(x, None), expected[:, :64], atol=0, rtol=0)  # a member alone: its rows
