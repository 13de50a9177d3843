"""SmolLM2 with a mixed batch through the scheduler: every request's greedy tokens equal PEFT's own
generate for its adapter (fp32, CPU), including requests that join while others are mid-decode."""

from __future__ import annotations

import threading

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters import read_adapter_folder
from server.engine.loaded import load_adapter
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler, SchedulerLimits
from tests.integration.conftest import CPU_FP32, example_adapters

QUESTIONS = ["What is the capital of France?", "How do I reset my password?", "Tell me a joke.",
             "Who wrote Hamlet?", "What is a computer?"]
NEW_TOKENS = 20
WAIT_S = 300


def _peft_tokens(base_path, adapter_dir, prompt_ids):
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=NEW_TOKENS)
    return out[0, ids.shape[1]:].tolist()


def test_mixed_batch_equals_peft_per_adapter(smollm2, smollm2_base, random_completion_adapter):
    folders = [random_completion_adapter, *example_adapters("completion").values(), None]
    adapters = [None if f is None else load_adapter(f.name, 1, read_adapter_folder(f), CPU_FP32.device,
                                                     CPU_FP32.dtype) for f in folders]
    prompts = [smollm2.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                     tokenize=True) for q in QUESTIONS]
    jobs = [(prompts[i % len(prompts)], folders[i % len(folders)], adapters[i % len(adapters)]) for i in range(6)]
    results = [[] for _ in jobs]
    finished = [threading.Event() for _ in jobs]

    def emitter(i):
        def emit(item):
            assert not isinstance(item, BaseException), item
            results[i].append(item.token_id)
            if item.finish_reason is not None:
                finished[i].set()
        return emit

    sched = Scheduler(smollm2, SchedulerLimits(max_running=4, max_len=512), threading.Lock())
    sched.start()
    try:
        for i, (prompt, _, adapter) in enumerate(jobs):  # 6 requests, 4 slots: two join mid-decode
            sched.submit(GenerationRequest(list(prompt), SamplingParams(max_tokens=NEW_TOKENS), adapter,
                                           emit=emitter(i)))
        assert all(event.wait(WAIT_S) for event in finished)
    finally:
        sched.stop()
    for i, (prompt, folder, _) in enumerate(jobs):
        assert results[i] == _peft_tokens(smollm2_base.path, folder, list(prompt)), f"request {i} ({folder})"
