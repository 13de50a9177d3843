"""Freeze fine-tunes served per request: rows of a freeze adapter run its trained linears in place of the
base's, in one batch with LoRA, IA3 and base rows, and merged; logits equal the HF model with those
tensors loaded (fp32, CPU). Full fine-tunes are refused as adapters, with the way to serve them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from adapters import AdapterFormatError, AdapterMismatchError, Manifest, read_adapter_folder, validate_against_base
from adapters.dense import TRAINED_WEIGHTS_FILE
from adapters.fingerprint import fingerprint_base_folder
from adapters.manifest import write_manifest
from server.engine.batch_runner import BatchRunner, RowInput
from server.engine.merge_mode import Merger
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler, SchedulerLimits
from tests.server.conftest import Collector, load_folder
from tests.server.test_ia3 import make_ia3

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "I like to eat"]


def make_freeze(base_dir: Path, out: Path, seed: int, modules: list[str], method: str = "freeze") -> Path:
    """A freeze folder as `training freeze` writes it: the changed tensors, named as in the model, and a manifest."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    trained = {}
    for module in modules:
        for name in (f"{module}.weight", f"{module}.bias"):
            if name in params:
                trained[name] = params[name].detach() + torch.randn(params[name].shape, generator=generator) * 0.2
    out.mkdir(parents=True)
    save_file(trained, str(out / TRAINED_WEIGHTS_FILE))
    write_manifest(out, Manifest(task="completion", base_name=base_dir.name,
                                 base_fingerprint=fingerprint_base_folder(base_dir), method=method))
    return out


def _hf_with(base_dir: Path, folder: Path | None):
    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if folder is not None:
        model.load_state_dict(load_file(str(folder / TRAINED_WEIGHTS_FILE)), strict=False)
    return model


@pytest.fixture(scope="module")
def freeze_folders(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("freeze")
    mlp = [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return {
        "last-mlp": make_freeze(tiny_llama_dir, root / "last-mlp", 31, mlp),
        "attn": make_freeze(tiny_llama_dir, root / "attn", 32, ["model.layers.0.self_attn.q_proj",
                                                              "model.layers.1.mlp.down_proj"]),
    }


@pytest.mark.parametrize("kernel", ["stacked", "loop"])
def test_freeze_rows_beside_lora_ia3_and_base_rows_equal_hf(kernel, tiny_llama_base, tiny_llama_base_loop, tiny_llama_dir,
                                                            freeze_folders, tiny_adapters, tmp_path):
    base = tiny_llama_base if kernel == "stacked" else tiny_llama_base_loop
    loaded = {name: load_folder(folder, base, name) for name, folder in freeze_folders.items()}
    loaded["alpha"] = load_folder(tiny_adapters["alpha"], base, "alpha")
    loaded["ia3"] = load_folder(make_ia3(tiny_llama_dir, tmp_path / "ia3", 33), base, "ia3")
    names = ["last-mlp", "alpha", "attn", None, "ia3", "last-mlp"]
    ids = [base.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(len(names))]
    runner = BatchRunner(base, num_slots=len(names), max_len=64)
    logits = runner.forward([RowInput(i, 0, ids[i], loaded.get(n)) for i, n in enumerate(names)])
    nxt = [int(row.argmax()) for row in logits]
    decoded = runner.forward([RowInput(i, len(ids[i]), [nxt[i]], loaded.get(n)) for i, n in enumerate(names)])
    for row, name in enumerate(names):
        if name in (None, "last-mlp", "attn"):
            model = _hf_with(tiny_llama_dir, freeze_folders[name] if name else None)
            with torch.no_grad():
                expected = model(input_ids=torch.tensor([ids[row] + [nxt[row]]])).logits[0]
            torch.testing.assert_close(logits[row], expected[-2], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(decoded[row], expected[-1], atol=1e-4, rtol=1e-4)
    plain = _hf_with(tiny_llama_dir, None)
    with torch.no_grad():
        base_logits = plain(input_ids=torch.tensor([ids[0]])).logits[0, -1]
    assert (logits[0] - base_logits).abs().max() > 1e-2  # the freeze weights matter: the check has teeth


def test_freeze_requests_through_the_scheduler_and_merged(tiny_llama_base, tiny_llama_dir, freeze_folders):
    base = tiny_llama_base
    loaded = {name: load_folder(folder, base, name) for name, folder in freeze_folders.items()}
    ids = base.tokenizer(PROMPTS[1])["input_ids"]
    expected = {}
    for name, folder in freeze_folders.items():
        prompt = torch.tensor([ids])
        with torch.no_grad():
            out = _hf_with(tiny_llama_dir, folder).generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                                            do_sample=False, max_new_tokens=6, min_new_tokens=6,
                                                            pad_token_id=0)
        expected[name] = out[0, len(ids):].tolist()
    for merge in (False, True):
        before = {n: p.clone() for n, p in base.model.named_parameters()}
        sched = Scheduler(base, SchedulerLimits(max_running=2, max_waiting=8, max_len=64), threading.Lock(), merge=merge)
        sched.start()
        try:
            jobs = []
            for name in ["last-mlp", "attn", "last-mlp"]:
                collect = Collector()
                sched.submit(GenerationRequest(ids, SamplingParams(max_tokens=6, ignore_eos=True), loaded[name],
                                               emit=collect))
                jobs.append((name, collect))
            for name, collect in jobs:
                assert collect.tokens == expected[name], (name, merge)
        finally:
            sched.stop()
        for name, param in base.model.named_parameters():
            assert torch.equal(param, before[name]), name  # merged weights restored exactly


def test_freeze_folders_that_the_server_cannot_serve_are_refused(tiny_llama_base, tiny_llama_dir, tmp_path):
    norm = make_freeze(tiny_llama_dir, tmp_path / "norm", 1, ["model.layers.1.post_attention_layernorm"])
    with pytest.raises(AdapterMismatchError, match="no linear layer of"):
        validate_against_base(read_adapter_folder(norm), tiny_llama_base.signature)
    full = make_freeze(tiny_llama_dir, tmp_path / "full", 1, ["model.layers.1.mlp.up_proj"], method="full")
    with pytest.raises(AdapterFormatError, match=r"complete models, not adapters: serve one as the base"):
        read_adapter_folder(full)
    broken = make_freeze(tiny_llama_dir, tmp_path / "broken", 1, ["model.layers.1.mlp.up_proj"])
    (broken / TRAINED_WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(AdapterFormatError, match="does not match its hash"):
        read_adapter_folder(broken)
