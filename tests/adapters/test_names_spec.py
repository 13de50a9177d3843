"""Adapter names, and parsing `adapter_config.json` into a LoraSpec (scaling, patterns, targets, refusals)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest

from adapters import AdapterFormatError, AdapterNameError, parse_lora_config, read_adapter_folder, validate_adapter_name
from adapters.names import MAX_NAME_LENGTH
from adapters.spec import MAX_RANK
from tests.adapters.peft_folders import make_peft_model

PEFT_PREFIX = "base_model.model."


@pytest.mark.parametrize("name", ["a", "tenant-42", "my_adapter.v2", "A1", "x" * MAX_NAME_LENGTH])
def test_good_names_pass(name):
    assert validate_adapter_name(name) == name


@pytest.mark.parametrize("name", [
    "", "../x", "a/b", "a\\b", ".hidden", "x" * (MAX_NAME_LENGTH + 1), "has space", "-lead", "a..b", "..",
    "abc\n",  # a regex anchored with "$" lets a trailing newline through
    "tab\tname", "ünï", None, 42, "_lead", ".", "-", "a" * 65, "a:b", "a%2e", "",
])
def test_bad_names_are_refused(name):
    with pytest.raises(AdapterNameError):
        validate_adapter_name(name)


def test_names_are_at_most_64_characters():
    assert MAX_NAME_LENGTH == 64  # short enough for a metric label, a folder name and a sha256 hex digest


def test_real_peft_config_parses(peft_folder):
    raw = json.loads((peft_folder / "adapter_config.json").read_text())
    spec = parse_lora_config(raw)
    assert (spec.r, spec.lora_alpha, spec.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
    assert spec.task_type == "CAUSAL_LM" and spec.base_model_name_or_path == raw["base_model_name_or_path"]
    assert not spec.use_rslora and not spec.fan_in_fan_out and spec.modules_to_save == ()
    assert spec.scaling_for("model.layers.1.self_attn.v_proj") == 2.0


def test_scaling_is_alpha_over_r_or_sqrt_r():
    plain = parse_lora_config({"r": 16, "lora_alpha": 8, "target_modules": ["q_proj"]})
    rs = parse_lora_config({"r": 16, "lora_alpha": 8, "target_modules": ["q_proj"], "use_rslora": True})
    assert plain.scaling_for("q_proj") == 0.5
    assert rs.scaling_for("q_proj") == 2.0
    assert parse_lora_config({"r": 4, "target_modules": ["q"]}).scaling_for("q") == 1.0  # alpha defaults to r


def test_rank_and_alpha_patterns_apply_per_module():
    spec = parse_lora_config({
        "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"v_proj": 4, "model.layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 2},
    })
    expected = {"layers.0.self_attn.q_proj": (8, 2.0), "layers.1.self_attn.q_proj": (2, 8.0),
                "layers.0.self_attn.v_proj": (4, 0.5)}
    for module, rank_and_scaling in expected.items():
        name = "model." + module
        assert (spec.rank_for(name), spec.scaling_for(name)) == rank_and_scaling, name
    rs = parse_lora_config({"r": 4, "lora_alpha": 8, "target_modules": ["o"], "use_rslora": True,
                            "rank_pattern": {"o": 16}})
    assert math.isclose(rs.scaling_for("layers.0.o"), 8 / 4)


def test_target_modules_list_is_a_suffix_match_and_a_string_is_a_regex():
    listed = parse_lora_config({"r": 4, "target_modules": ["v_proj", "q_proj"]})
    assert listed.target_modules == ("q_proj", "v_proj")
    assert listed.targets("model.layers.3.self_attn.q_proj") and listed.targets("q_proj")
    assert not listed.targets("model.layers.3.mlp.up_proj")
    assert not listed.targets("model.layers.3.self_attn.xq_proj")  # a suffix on a dot boundary, not any suffix
    regex = parse_lora_config({"r": 4, "target_modules": r".*\.(q_proj|o_proj)"})
    assert regex.targets("model.layers.0.self_attn.o_proj")
    assert not regex.targets("model.layers.0.self_attn.k_proj")
    assert not regex.targets("model.layers.0.self_attn.q_proj_extra")  # fullmatch, as PEFT does


@pytest.mark.parametrize("config", [
    {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj"],
     "rank_pattern": {"v_proj": 2, "model.layers.1.self_attn.q_proj": 3}, "alpha_pattern": {"up_proj": 5}},
    {"r": 4, "lora_alpha": 8, "target_modules": r".*\.(q_proj|o_proj)", "use_rslora": True,
     "rank_pattern": {"o_proj": 16}},
    {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
], ids=["patterns", "rslora-regex", "all-linear"])
def test_rank_and_scaling_equal_what_peft_built(tiny_llama_dir, config):
    peft_model = make_peft_model(tiny_llama_dir, **config)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        adapter = read_adapter_folder(Path(tmp))
    built = {name[len(PEFT_PREFIX):]: module for name, module in peft_model.named_modules()
             if hasattr(module, "lora_A") and "default" in module.lora_A}
    assert set(adapter.lora) == set(built)
    for name, module in built.items():
        assert adapter.lora[name].rank == module.r["default"], name
        assert math.isclose(adapter.lora[name].scaling, module.scaling["default"]), name
        assert adapter.spec.targets(name), name


@pytest.mark.parametrize("raw,fragment", [
    ({"r": 8, "target_modules": ["q"], "use_dora": True}, "DoRA"),
    ({"r": 8, "target_modules": ["q"], "bias": "all"}, "bias"),
    ({"r": 8, "target_modules": ["q"], "bias": "lora_only"}, "bias"),
    ({"r": 8, "target_modules": ["q"], "lora_bias": True}, "bias"),
    ({"r": 0, "target_modules": ["q"]}, "'r'"),
    ({"r": -4, "target_modules": ["q"]}, "'r'"),
    ({"r": MAX_RANK + 1, "target_modules": ["q"]}, "'r'"),
    ({"r": "8", "target_modules": ["q"]}, "'r'"),
    ({"r": 4.0, "target_modules": ["q"]}, "'r'"),
    ({"r": True, "target_modules": ["q"]}, "'r'"),
    ({"target_modules": ["q"]}, "'r'"),
    ({"r": 8, "target_modules": []}, "target_modules"),
    ({"r": 8}, "target_modules"),
    ({"r": 8, "target_modules": "("}, "regex"),
    ({"r": 8, "target_modules": ["q"], "lora_alpha": float("nan")}, "lora_alpha"),
    ({"r": 8, "target_modules": ["q"], "lora_alpha": 0}, "lora_alpha"),
    ({"r": 8, "target_modules": ["q"], "rank_pattern": {"q": 0}}, "rank_pattern"),
    ({"r": 8, "target_modules": ["q"], "alpha_pattern": {"q": "big"}}, "alpha_pattern"),
    ({"r": 8, "target_modules": ["q"], "layer_replication": [[0, 2]]}, "layer_replication"),
    ({"r": 8, "target_modules": ["q"], "peft_type": "IA3"}, "IA3"),
    ({"r": 8, "target_modules": ["q"], "peft_type": "PREFIX_TUNING"}, "PREFIX_TUNING"),
])
def test_unsupported_or_invalid_configs_are_refused(raw, fragment):
    with pytest.raises(AdapterFormatError, match=fragment):
        parse_lora_config(raw)
