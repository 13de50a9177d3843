"""Prompt tuning, prefix tuning and P-tuning v2 adapters served per request, in the same continuous batch
as LoRA adapters and base rows: greedy tokens equal PEFT's own `generate` with that adapter, token for
token (fp32, CPU)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType
from transformers import AutoModelForCausalLM

from adapters import AdapterFormatError, AdapterMismatchError, read_adapter_folder, validate_against_base
from server.engine.batch_runner import BatchRunner, RowInput
from server.engine.loaded import load_adapter
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler, SchedulerLimits
from tests.server.conftest import CPU_FP32, Collector, load_folder, make_peft_folder

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "I like to eat", "Hello!"]
NEW_TOKENS = 8


def _make(base_dir: Path, out: Path, config, seed: int) -> Path:
    """PEFT's init is small; the virtual positions redrawn so that they matter."""
    return make_peft_folder(base_dir, out, config, seed, "prompt_encoder", lambda p: p.normal_(0, 1.0))


@pytest.fixture(scope="module")
def prompt_folders(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompt-learning")
    return {
        "prompt": _make(tiny_llama_dir, root / "prompt",
                        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5), 11),
        "prefix": _make(tiny_llama_dir, root / "prefix",
                        PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, prefix_projection=True,
                                           encoder_hidden_size=16), 12),
        "ptuning": _make(tiny_llama_dir, root / "ptuning",
                         PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6), 13),
    }


def _peft_greedy(base_dir: Path, folder: Path | None, prompt_ids: list[int]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if folder is not None:
        model = PeftModel.from_pretrained(model, folder).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_prompt_learning_adapters_in_a_mixed_batch_match_peft(tiny_llama_base, tiny_llama_dir, prompt_folders,
                                                               tiny_adapters):
    base = tiny_llama_base
    folders = {**prompt_folders, "alpha": tiny_adapters["alpha"]}
    loaded = {name: load_folder(folder, base, name) for name, folder in folders.items()}
    assert loaded["prompt"].virtual_tokens is not None and loaded["ptuning"].prefix is not None
    rows = [("prompt", PROMPTS[0]), ("prefix", PROMPTS[1]), (None, PROMPTS[2]), ("alpha", PROMPTS[3]),
            ("ptuning", PROMPTS[4]), ("prefix", PROMPTS[0])]
    sched = Scheduler(base, SchedulerLimits(max_running=4, max_waiting=8, max_len=64), threading.Lock())
    sched.start()
    try:
        jobs = []
        for name, prompt in rows:  # 6 requests, 4 slots: two join mid-decode, after others leave
            ids = base.tokenizer(prompt)["input_ids"]
            collect = Collector()
            sched.submit(GenerationRequest(ids, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True),
                                           loaded.get(name), emit=collect))
            jobs.append((name, ids, collect))
        for name, ids, collect in jobs:
            expected = _peft_greedy(tiny_llama_dir, folders[name] if name else None, ids)
            assert collect.tokens == expected, name
    finally:
        sched.stop()


def test_prompt_learning_logits_in_one_batch_equal_peft(tiny_llama_base, tiny_llama_dir, prompt_folders):
    """The random tiny model repeats its last token whatever comes first, so greedy tokens alone cannot show
    that virtual tokens were applied: compare next-token logits with PEFT's, and with the base's."""
    base = tiny_llama_base
    runner = BatchRunner(base, num_slots=4, max_len=64)
    adapters = {name: load_adapter(name, 1, read_adapter_folder(folder), CPU_FP32.device, CPU_FP32.dtype)
                for name, folder in prompt_folders.items()}
    ids = [base.tokenizer(p)["input_ids"] for p in PROMPTS[:4]]
    rows = [RowInput(0, 0, [0] * 5 + ids[0], None, prompt=adapters["prompt"]),
            RowInput(1, 4, ids[1], None, prompt=adapters["prefix"]),
            RowInput(2, 0, ids[2], None),
            RowInput(3, 6, ids[3], None, prompt=adapters["ptuning"])]
    logits = runner.forward(rows)
    for row, (name, prompt_ids) in enumerate([("prompt", ids[0]), ("prefix", ids[1]), (None, ids[2]),
                                              ("ptuning", ids[3])]):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        plain = _last_logits(model, prompt_ids)
        expected = plain if name is None else _last_logits(PeftModel.from_pretrained(model, prompt_folders[name]),
                                                           prompt_ids)
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)
        if name is not None:
            assert (expected - plain).abs().max() > 1e-2, name  # the adapter changes the logits: the check has teeth


def _last_logits(model, prompt_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]


def test_prompt_learning_adapters_are_checked_against_the_base(tiny_llama_base, prompt_folders, tmp_path):
    import json

    for name in ("prompt", "prefix"):
        bad = tmp_path / name
        bad.mkdir()
        config = json.loads((prompt_folders[name] / "adapter_config.json").read_text())
        config["token_dim"] = config["token_dim"] * 2 if name == "prompt" else config["token_dim"]
        config["num_layers"] = config["num_layers"] + (0 if name == "prompt" else 1)
        (bad / "adapter_config.json").write_text(json.dumps(config))
        (bad / "adapter_model.safetensors").write_bytes((prompt_folders[name] / "adapter_model.safetensors").read_bytes())
        with pytest.raises(AdapterFormatError, match="has shape"):
            read_adapter_folder(bad)  # the tensor no longer matches its own config
    other = json.loads((prompt_folders["prefix"] / "adapter_config.json").read_text())
    other.update(num_attention_heads=1, token_dim=other["token_dim"])  # same width, other head split
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "adapter_config.json").write_text(json.dumps(other))
    (tmp_path / "heads" / "adapter_model.safetensors").write_bytes(
        (prompt_folders["prefix"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterMismatchError, match="key/value heads"):
        validate_against_base(read_adapter_folder(tmp_path / "heads"), tiny_llama_base.signature)
    classifier = json.loads((prompt_folders["prompt"] / "adapter_config.json").read_text())
    classifier["task_type"] = "SEQ_CLS"
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "adapter_config.json").write_text(json.dumps(classifier))
    (tmp_path / "cls" / "adapter_model.safetensors").write_bytes(
        (prompt_folders["prompt"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterFormatError, match="completion"):
        read_adapter_folder(tmp_path / "cls")


def test_prompt_and_prefix_adapters_are_added_and_served_over_http(llama_client, prompt_folders, tiny_llama_dir):
    from transformers import AutoTokenizer

    from tests.server.conftest import ADMIN

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for name in ("prompt", "ptuning"):
        added = llama_client.post("/v1/load_lora_adapter", headers=ADMIN,
                                  json={"lora_name": name, "lora_path": str(prompt_folders[name])})
        assert added.status_code == 200, added.text
        body = {"model": name, "prompt": PROMPTS[2], "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        answer = llama_client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        expected = _peft_greedy(tiny_llama_dir, prompt_folders[name], tokenizer(PROMPTS[2])["input_ids"])
        assert answer.json()["choices"][0]["text"] == tokenizer.decode(expected)
        assert answer.json()["usage"]["completion_tokens"] == NEW_TOKENS


def test_a_prefix_row_padded_to_a_longer_neighbour_stays_inside_its_slot(tiny_llama_base, prompt_folders):
    """A prefix row starts at V; padded to a long plain row's length it used to run past the cache's end (the
    step failed: 'exceeds the KV cache length'). Its padding goes to the scratch slot now; logits equal each
    row run alone."""
    base = tiny_llama_base
    prefix = load_adapter("prefix", 1, read_adapter_folder(prompt_folders["prefix"]), CPU_FP32.device, CPU_FP32.dtype)
    long_ids = base.tokenizer(" ".join(PROMPTS))["input_ids"]
    max_len = len(long_ids) + 2  # the long row fits; the prefix row's start + the long length does not
    short_ids = base.tokenizer(PROMPTS[1])["input_ids"]
    assert prefix.num_virtual_tokens + len(long_ids) > max_len >= prefix.num_virtual_tokens + len(short_ids)
    together = BatchRunner(base, num_slots=2, max_len=max_len).forward(
        [RowInput(0, prefix.num_virtual_tokens, short_ids, None, prompt=prefix), RowInput(1, 0, long_ids, None)])
    alone = [BatchRunner(base, num_slots=1, max_len=max_len).forward([row])[0] for row in (
        RowInput(0, prefix.num_virtual_tokens, short_ids, None, prompt=prefix), RowInput(0, 0, long_ids, None))]
    for row in range(2):
        torch.testing.assert_close(together[row], alone[row], atol=1e-4, rtol=1e-4)
