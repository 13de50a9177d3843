"""Merge mode gives the base back bit for bit after any number of swaps, in bfloat16 too."""

from __future__ import annotations

import pytest
import torch

from adapters import read_adapter_folder
from adapters.merge import merge_into, unmerge_from
from server.engine.backend import Backend
from server.engine.base_model import load_base
from server.engine.loaded import load_adapter
from server.engine.merge_mode import Merger
from tests.server.conftest import _prepared
from tests.server.test_ia3 import make_ia3

BF16 = Backend(torch.device("cpu"), torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_base(tiny_llama_dir):
    return load_base(_prepared(tiny_llama_dir), BF16)


@pytest.fixture(scope="module")
def ia3_folder(tmp_path_factory, tiny_llama_dir):
    return {"ia3": make_ia3(tiny_llama_dir, tmp_path_factory.mktemp("ia3") / "ia3", 21)}


def _weights(base) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in base.model.named_parameters()}


def test_swaps_restore_the_bf16_base_exactly(bf16_base, tiny_adapters, ia3_folder):
    loaded = [load_adapter(name, 1, read_adapter_folder(path), BF16.device, BF16.dtype)
              for name, path in {**tiny_adapters, **ia3_folder}.items()]
    original = _weights(bf16_base)
    merger = Merger(bf16_base)
    for _ in range(3):
        for adapter in loaded:
            merger.switch_to(adapter)
            changed = [n for n, p in bf16_base.model.named_parameters() if not torch.equal(p, original[n])]
            assert changed, f"{adapter.name} changed no weight"
    merger.switch_to(None)
    for name, param in bf16_base.model.named_parameters():
        assert torch.equal(param, original[name]), f"{name} drifted"
    assert merger.swaps == 3 * len(loaded) + 1


def test_subtracting_the_delta_again_is_not_exact_in_bf16(bf16_base, tiny_adapters):
    """Why the merger keeps copies: add then subtract a LoRA delta in bfloat16 moves the weight."""
    adapter = load_adapter("alpha", 1, read_adapter_folder(tiny_adapters["alpha"]), BF16.device, BF16.dtype)
    module, weights = next(iter(adapter.lora.items()))
    weight = bf16_base.model.get_submodule(module).base.weight.detach().clone()
    original = weight.clone()
    merge_into(weight, weights)
    unmerge_from(weight, weights)
    assert not torch.equal(weight, original)
