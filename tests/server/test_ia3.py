"""IA3 adapters served per request: in one mixed batch with LoRA and base rows (both LoRA kernels, prefill
and decode), in classification, and merged; logits equal PEFT's own IA3 model (fp32, CPU)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from peft import IA3Config, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from adapters import AdapterFormatError, AdapterMismatchError, read_adapter_folder, validate_against_base
from server.engine.batch_runner import BatchRunner, RowInput
from server.engine.classify import classify_rows
from server.engine.merge_mode import Merger
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler, SchedulerLimits
from tests.server.conftest import Collector, load_folder, make_peft_folder

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "I like to eat"]
NEW_TOKENS = 6


def make_ia3(base_dir: Path, out: Path, seed: int, **config) -> Path:
    """PEFT starts IA3 at ones (the identity); every vector redrawn so that it matters."""
    return make_peft_folder(base_dir, out, IA3Config(task_type=TaskType.CAUSAL_LM, **config), seed, "ia3_l",
                            lambda p: p.uniform_(0.2, 2.0))


@pytest.fixture(scope="module")
def ia3_folders(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ia3")
    return {
        "ia3": make_ia3(tiny_llama_dir, root / "ia3", 21),  # PEFT's defaults: k_proj, v_proj, down_proj (input)
        "ia3-qo": make_ia3(tiny_llama_dir, root / "ia3-qo", 22, target_modules=["q_proj", "o_proj", "up_proj"],
                           feedforward_modules=["o_proj"]),
    }


def _loaded(folders: dict[str, Path], base) -> dict:
    return {name: load_folder(folder, base, name) for name, folder in folders.items()}


def _peft_logits(base_dir: Path, folder: Path | None, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if folder is not None:
        model = PeftModel.from_pretrained(model, folder).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_ia3_folder_is_read_with_each_vector_on_its_side(ia3_folders):
    folder = read_adapter_folder(ia3_folders["ia3-qo"])
    sides = {module.rsplit(".", 1)[1]: scale.on_input for module, scale in folder.ia3.items()}
    assert sides == {"q_proj": False, "o_proj": True, "up_proj": False}
    assert folder.lora == {} and folder.task == "completion"


@pytest.mark.parametrize("kernel", ["stacked", "loop"])
def test_ia3_rows_in_a_mixed_batch_equal_peft_at_prefill_and_decode(kernel, tiny_llama_base, tiny_llama_base_loop,
                                                                     tiny_llama_dir, ia3_folders, tiny_adapters):
    base = tiny_llama_base if kernel == "stacked" else tiny_llama_base_loop
    folders = {**ia3_folders, "alpha": tiny_adapters["alpha"]}
    loaded = _loaded(folders, base)
    runner = BatchRunner(base, num_slots=4, max_len=64)
    names = ["ia3", "alpha", None, "ia3-qo"]
    ids = [base.tokenizer(p)["input_ids"] for p in PROMPTS]
    logits = runner.forward([RowInput(i, 0, ids[i], loaded.get(n)) for i, n in enumerate(names)])
    nxt = [int(row.argmax()) for row in logits]
    decoded = runner.forward([RowInput(i, len(ids[i]), [nxt[i]], loaded.get(n)) for i, n in enumerate(names)])
    for row, name in enumerate(names):
        expected = _peft_logits(tiny_llama_dir, folders[name] if name else None, ids[row] + [nxt[row]])
        torch.testing.assert_close(logits[row], expected[-2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(decoded[row], expected[-1], atol=1e-4, rtol=1e-4)
        if name is not None and name.startswith("ia3"):
            plain = _peft_logits(tiny_llama_dir, None, ids[row])
            assert (expected[-2] - plain[-1]).abs().max() > 1e-2, name  # the adapter matters: the check has teeth


def test_ia3_requests_decode_through_the_scheduler_as_peft_generates(tiny_llama_base, tiny_llama_dir, ia3_folders,
                                                                    tiny_adapters):
    base = tiny_llama_base
    folders = {**ia3_folders, "alpha": tiny_adapters["alpha"]}
    loaded = _loaded(folders, base)
    sched = Scheduler(base, SchedulerLimits(max_running=3, max_waiting=8, max_len=64), threading.Lock())
    sched.start()
    try:
        jobs = []
        for name, prompt in [("ia3", PROMPTS[0]), ("alpha", PROMPTS[1]), ("ia3-qo", PROMPTS[2]), (None, PROMPTS[3]),
                             ("ia3", PROMPTS[1])]:
            ids = base.tokenizer(prompt)["input_ids"]
            collect = Collector()
            sched.submit(GenerationRequest(ids, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True),
                                           loaded.get(name), emit=collect))
            jobs.append((name, ids, collect))
        for name, ids, collect in jobs:
            model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
            if name is not None:
                model = PeftModel.from_pretrained(model, folders[name]).eval()
            prompt = torch.tensor([ids])
            with torch.no_grad():
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
            assert collect.tokens == out[0, len(ids):].tolist(), name
    finally:
        sched.stop()


def test_merged_ia3_equals_per_row_ia3_and_unmerges_exactly(tiny_llama_base, tiny_llama_dir, ia3_folders):
    base = tiny_llama_base
    loaded = _loaded(ia3_folders, base)
    before = {n: p.clone() for n, p in base.model.named_parameters()}
    ids = base.tokenizer(PROMPTS[0])["input_ids"]
    merger = Merger(base)
    try:
        merger.switch_to(loaded["ia3-qo"])
        merged = BatchRunner(base, num_slots=1, max_len=64).forward([RowInput(0, 0, ids, None)])
        merger.switch_to(loaded["ia3"])
    finally:
        merger.switch_to(None)
    expected = _peft_logits(tiny_llama_dir, ia3_folders["ia3-qo"], ids)[-1]
    torch.testing.assert_close(merged[0], expected, atol=1e-4, rtol=1e-4)
    for name, param in base.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_ia3_classifier_rows_beside_lora_rows_equal_peft(tiny_bert_base, tiny_bert_dir, tiny_classifiers, tmp_path):
    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    peft_model = get_peft_model(model, IA3Config(task_type=TaskType.SEQ_CLS))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.uniform_(0.2, 2.0)
    peft_model.save_pretrained(tmp_path / "ia3-cls")
    folders = {"ia3": tmp_path / "ia3-cls", "two": tiny_classifiers["two"]}
    loaded = _loaded(folders, tiny_bert_base)
    texts = ["a fine film", "dull and far too long", "not bad at all"]
    rows = [loaded["ia3"], loaded["two"], loaded["ia3"]]
    results = classify_rows(tiny_bert_base, texts, rows, max_length=32)
    for text, result, name in zip(texts, results, ["ia3", "two", "ia3"]):
        num_labels = 3 if name == "ia3" else 2
        reference = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=num_labels), folders[name]).eval()
        batch = tiny_bert_base.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(reference(**batch).logits[0], dim=-1)
        torch.testing.assert_close(torch.tensor(list(result.probs.values())), probs, atol=1e-5, rtol=1e-4)


def test_ia3_folders_that_do_not_fit_are_refused(tiny_llama_base, ia3_folders, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(ia3_folders["ia3"] / "adapter_model.safetensors")
    config = (ia3_folders["ia3"] / "adapter_config.json").read_text()
    cases = {
        "wide": ({k: torch.cat([v, v], dim=1) if "down_proj" in k else v for k, v in state.items()}, AdapterMismatchError,
                 "IA3 vector of size"),
        "nan": ({k: torch.full_like(v, float("nan")) for k, v in state.items()}, AdapterFormatError, "NaN"),
        "matrix": ({k: v.expand(-1, 2).contiguous() if "k_proj" in k else v for k, v in state.items()},
                   AdapterFormatError, "IA3 vectors are"),
        "empty": ({}, AdapterFormatError, "no IA3 vectors"),
    }
    for name, (tensors, error, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(config)
        save_file(tensors, folder / "adapter_model.safetensors")
        with pytest.raises(error, match=message):
            validate_against_base(read_adapter_folder(folder), tiny_llama_base.signature)
    bad = json.loads(config)
    bad["task_type"] = "SEQ_2_SEQ_LM"
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "adapter_config.json").write_text(json.dumps(bad))
    save_file(state, tmp_path / "task" / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="CAUSAL_LM or SEQ_CLS"):
        read_adapter_folder(tmp_path / "task")
