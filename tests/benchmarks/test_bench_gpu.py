"""benchmarks/bench_gpu.py end to end in its --tiny setting on the CPU: one subprocess run (about 25 s on
this project's 2-core machine, PEFT included), its last line parsed. It checks that every system ran and
that the ratios and the roofline are computed from the figures printed beside them; it checks no speed
(wall-clock thresholds on a shared CPU say nothing about the GPU figures the script exists for)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ("a_engine_base", "b_engine_mixed", "c_peft_mixed_batch", "d_peft_sequential", "e_engine_zipf_sweep")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench_gpu") / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), out


def test_every_system_ran_and_produced_tokens(tiny_run):
    summary, _ = tiny_run
    for key in SYSTEMS:
        system = summary["systems"][key]
        assert "error" not in system, (key, system)
        assert system["tokens"] > 0 and system["tokens_per_s"] > 0, key
        assert system["tokens_per_s"] == pytest.approx(system["tokens"] / system["seconds"])
        assert summary["tokens_per_s"][key] == system["tokens_per_s"]
    batch, new, rounds = summary["batch"], summary["new_tokens"], summary["rounds"]
    assert summary["systems"]["a_engine_base"]["tokens"] == batch * rounds * new
    assert summary["systems"]["b_engine_mixed"]["decode_tokens_per_s"] > 0


def test_the_header_fields_are_there(tiny_run):
    summary, _ = tiny_run
    assert summary["gpu"].startswith("cpu") and summary["device"] == "cpu"
    assert summary["copy_bandwidth_gb_s"] > 0
    assert {"torch", "transformers", "peft"} <= set(summary["versions"])
    assert summary["subject"]["parameters"] > 0 and summary["targets"]


def test_the_roofline_is_the_bandwidth_over_the_bytes_of_a_step(tiny_run):
    summary, _ = tiny_run
    line = summary["roofline"]
    assert line["bytes_per_step"] == pytest.approx(line["weight_bytes"] + line["kv_bytes_per_step"], abs=1)
    assert line["mean_context"] == summary["prompt_tokens"] + summary["new_tokens"] / 2
    bandwidth = summary["copy_bandwidth_gb_s"] * 1e9  # rounded to 10 MB/s in the JSON
    assert line["tokens_per_s"] == pytest.approx(summary["batch"] * bandwidth / line["bytes_per_step"], rel=1e-2)
    assert 0 < line["b_tokens_per_s"] < line["tokens_per_s"]  # (b)'s adapters add bytes to every step


def test_the_ratios_are_computed_from_the_figures(tiny_run):
    summary, _ = tiny_run
    tps, systems, ratios = summary["tokens_per_s"], summary["systems"], summary["ratios"]
    expected = {"b/a": tps["b_engine_mixed"] / tps["a_engine_base"],
                "b/roofline": systems["b_engine_mixed"]["decode_tokens_per_s"] / summary["roofline"]["tokens_per_s"],
                "b/c": tps["b_engine_mixed"] / tps["c_peft_mixed_batch"],
                "e/a": tps["e_engine_zipf_sweep"] / tps["a_engine_base"]}
    for key, value in expected.items():
        assert ratios[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
        assert summary["meets_goals"][key] == (ratios[key] >= summary["goals"][key])


def test_the_sweep_keeps_most_adapters_out_of_memory(tiny_run):
    sweep = tiny_run[0]["systems"]["e_engine_zipf_sweep"]
    assert sweep["registered"] > sweep["memory_tier"] > sweep["device_slots"]
    assert sweep["resident_at_end"] <= sweep["memory_tier"]
    assert sweep["tier_hits"] + sweep["tier_misses"] == sweep["requests"]  # one acquire per request
    assert sum(sweep["trace_ranks"].values()) == sweep["requests"]


def test_the_json_file_is_the_last_line(tiny_run):
    summary, out = tiny_run
    assert json.loads(out.read_text()) == summary
