"""Fused q/k/v and gate/up matmuls (fused.py) against the same base unfused, with every per-row method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine.base_model import load_base
from server.engine.batch_runner import BatchRunner, RowInput
from server.engine.fused import FusedLinear
from server.engine.merge_mode import Merger
from tests.server.conftest import CPU_FP32, _prepared, load_folder
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
