"""The plan's pieces (zipf, the admin schedule, the plan's JSON round trip), SSE timing, the summary's
figures and the constructed adapters. No Locust process, no server."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from loadtest.report import percentiles_ms, summarize
from loadtest.timing import RequestRecord, read_sse
from loadtest.workload import Plan, Sample, ZipfChooser, admin_schedule, op_times


def test_zipf_is_seeded_and_follows_its_ranks():
    names = tuple(f"a{i}" for i in range(8))
    chooser = ZipfChooser(names, 1.1, seed=3)
    assert chooser.ranked == ZipfChooser(names, 1.1, seed=3).ranked
    rng = random.Random(1)
    counts = Counter(chooser.choose(rng) for _ in range(20_000))
    probabilities = chooser.probabilities()
    assert sum(probabilities.values()) == pytest.approx(1.0)
    for name, p in probabilities.items():
        assert counts[name] / 20_000 == pytest.approx(p, abs=0.015)
    top, second = chooser.ranked[:2]
    assert probabilities[top] / probabilities[second] == pytest.approx(2 ** 1.1)


def test_admin_schedule_adds_replaces_and_removes():
    assert admin_schedule(1) == ("add", "replace", "remove")
    ops = admin_schedule(7)
    assert ops.count("replace") == 7 and ops[0] == "add" and ops[-1] == "remove"
    assert ops.count("remove") == ops.count("add") == 3
    times = op_times(ops, 60.0)
    assert times == sorted(times) and times[-1] < 60.0


def test_plan_round_trips(tmp_path):
    plan = Plan("http://127.0.0.1:1", "http://127.0.0.1:2", "base", ("a", "b"), ("sentiment",),
                (Sample("Hi?", 3),), ("a review",), "swap", {"v0": "/x"}, {"v0": "text"}, "The", 4,
                ("add", "remove"), 20.0, "/r", "/v")
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan


def test_read_sse_times_text_chunks():
    clock = iter([1.5, 1.7, 2.0]).__next__
    lines = [
        'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}', "",
        'data: {"choices": [{"delta": {"content": "Hel"}}]}',
        'data: {"choices": [{"delta": {"content": "lo"}}]}',
        'data: {"choices": [{"delta": {"content": "!"}, "finish_reason": "length"}]}',
        'data: {"choices": [], "usage": {"completion_tokens": 3}}',
        "data: [DONE]",
    ]
    result = read_sse([line.encode() for line in lines], sent=1.0, clock=clock, chat=True)
    assert result.text == "Hello!" and result.done and result.output_tokens == 3
    assert result.ttft_s == pytest.approx(0.5) and result.itl_s == pytest.approx([0.2, 0.3])


def test_read_sse_stops_at_an_error_event():
    lines = ['data: {"choices": [{"text": "a"}]}', 'data: {"error": {"message": "boom"}}']
    result = read_sse(lines, 0.0, iter([0.1]).__next__, chat=False)
    assert result.error == "boom" and not result.done


def test_summary_follows_vllm_definitions():
    records = [
        RequestRecord(100.0, "completion", "a", True, 200, True, e2e_s=1.0, ttft_s=0.2, itl_s=[0.1, 0.3],
                      output_tokens=5),
        RequestRecord(100.5, "chat", "b", False, 200, True, e2e_s=1.5, output_tokens=10),
        RequestRecord(101.0, "classify", "s", False, 200, True, e2e_s=0.1),
        RequestRecord(101.0, "probe", "swap", False, 404, False, e2e_s=0.01, error="absent"),
    ]
    versions = {"checked": 3, "wrong": 0, "admin_ops": 2, "verified": {"1": 2}}
    summary = summarize(records, versions, 0, {"users": 5})
    assert summary["duration_s"] == 2.0  # 100.0 to 102.0 (the chat ends last)
    assert summary["requests_per_s"] == 1.5 and summary["output_tokens_per_s"] == 7.5
    assert summary["tpot_ms"]["p50"] == pytest.approx(200.0)  # (1.0 - 0.2) / (5 - 1)
    assert summary["ttft_ms"]["p99"] == pytest.approx(200.0)
    assert summary["failed_requests"] == {} and summary["versions_verified"] == 1
    assert percentiles_ms([]) == {"p50": None, "p95": None, "p99": None}


def test_constructed_adapter_is_a_peft_folder_that_validates(tmp_path, tiny_llama_dir):
    from adapters import read_adapter_folder
    from loadtest.constructed import write_random_lora

    folder = write_random_lora(tiny_llama_dir, tmp_path / "synth", seed=1, b_std=0.2, base_name="tiny")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    adapter = read_adapter_folder(folder)
    assert len(adapter.lora) == 2 * 2  # q_proj and v_proj of both layers


def test_the_locust_side_imports_no_torch():
    """Locust cannot share a process with torch (gevent's monkey-patching): the users must not import it."""
    code = "import sys, loadtest.locustfile; assert 'torch' not in sys.modules, 'the locustfile imports torch'"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], check=True, timeout=120)
