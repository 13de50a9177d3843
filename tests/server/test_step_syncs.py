"""A decode step reads nothing back from the device: no .item(), bool(), int() or .tolist() of a tensor
inside BatchRunner.forward_full (on a GPU each would stall the queue once per step).

On CPU the readers are patched to raise; on CUDA (gpu marker) torch's sync debug mode catches any sync."""

from __future__ import annotations

import contextlib

import pytest
import torch

from adapters import read_adapter_folder
from server.engine.backend import Backend
from server.engine.base_model import load_base
from server.engine.batch_runner import BatchRunner, RowInput
from server.engine.loaded import load_adapter
from tests.server.conftest import CPU_FP32, _prepared

READERS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def _no_reads(monkeypatch):
    with monkeypatch.context() as patch:
        for name in READERS:
            def refuse(self, *args, _name=name, **kwargs):
                raise AssertionError(f"Tensor.{_name} read a value back during a decode step")
            patch.setattr(torch.Tensor, name, refuse)
        yield


def _steps(base, adapters):
    """A prefill of three rows out of slot order, then decode steps with LoRA and base rows (the per-row
    kernel for distinct adapters, the masked one when rows share)."""
    tok = base.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("Once upon a time", "The capital of France is", "Hi")]
    alpha, beta = adapters
    prefill = [RowInput(0, 0, prompts[0], alpha), RowInput(1, 0, prompts[1], beta), RowInput(2, 0, prompts[2], None)]
    lengths = [len(p) for p in prompts]
    decodes = [[RowInput(i, lengths[i] + step, [7 + step], row.adapter) for i, row in enumerate(prefill)]
               for step in range(3)]
    shared = [[RowInput(i, lengths[i] + 3 + step, [9], alpha) for i in range(3)] for step in range(2)]
    return prefill, decodes + shared


def _loaded(tiny_adapters, backend):
    return [load_adapter(n, 1, read_adapter_folder(p), backend.device, backend.dtype) for n, p in tiny_adapters.items()]


def test_decode_steps_read_nothing_back(monkeypatch, tiny_llama_base, tiny_adapters):
    runner = BatchRunner(tiny_llama_base, 4, 64)
    prefill, decodes = _steps(tiny_llama_base, _loaded(tiny_adapters, CPU_FP32))
    runner.forward(prefill)
    for rows in decodes:
        runner.forward(rows)  # warm: slot loads and row buffers are built on first sight
    reference = BatchRunner(tiny_llama_base, 4, 64)
    reference.forward(prefill)
    expected = [reference.forward(rows) for rows in decodes]
    runner = BatchRunner(tiny_llama_base, 4, 64)
    runner.forward(prefill)
    with _no_reads(monkeypatch):
        got = [runner.forward(rows) for rows in decodes]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_steps_do_not_sync(tiny_llama_dir, tiny_adapters):
    backend = Backend(torch.device("cuda"), torch.bfloat16)
    base = load_base(_prepared(tiny_llama_dir), backend)
    runner = BatchRunner(base, 4, 64)
    prefill, decodes = _steps(base, _loaded(tiny_adapters, backend))
    runner.forward(prefill)
    for rows in decodes:
        runner.forward(rows)
    runner.forward(prefill)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rows in decodes:
            runner.forward(rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
