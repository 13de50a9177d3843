"""`training merge`: each method writes a folder PEFT loads whose forward is PEFT's own add_weighted_adapter
result; the manifest names the parents; incompatible parents are refused with a message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from adapters import Manifest, read_adapter_folder, read_manifest, write_manifest
from adapters.manifest import MERGE_METHODS
from adapters.merge import lora_delta
from training.cli import main
from training.merge import DENSITY_METHODS
from tests.adapters.peft_folders import save_peft_adapter

METHODS = MERGE_METHODS  # linear, cat, svd, ties, dare_linear, dare_ties
DENSITY = 0.5
WEIGHTS = (0.7, -0.4)
FP32_ATOL = 1e-5
INPUT_IDS = torch.tensor([[1, 17, 256, 9, 4000, 31]])


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    """`one` and `two`: rank 4 on q,v; `wide`: rank 8 on q,k,o with rsLoRA (for cat and svd only)."""
    root = tmp_path_factory.mktemp("merge-parents")
    return {
        "one": save_peft_adapter(tiny_llama_dir, root / "one", seed=1),
        "two": save_peft_adapter(tiny_llama_dir, root / "two", seed=2),
        "wide": save_peft_adapter(tiny_llama_dir, root / "wide", seed=3, r=8, lora_alpha=4, use_rslora=True,
                                  target_modules=["q_proj", "k_proj", "o_proj"]),
    }


def _merge(out: Path, folders: list[Path], method: str, weights=WEIGHTS, *extra: str) -> int:
    args = ["merge", str(out), "--method", method]
    for folder, weight in zip(folders, weights):
        args += ["--adapter", f"{folder}={weight}"]
    if method in DENSITY_METHODS:
        args += ["--density", str(DENSITY)]
    return main([*args, *extra])


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=INPUT_IDS).logits


@pytest.mark.parametrize("method", METHODS)
def test_each_method_matches_peft_add_weighted_adapter(tmp_path, tiny_llama_dir, parents, method, capsys):
    folders = [parents["one"], parents["two"]]
    assert _merge(tmp_path / "merged", folders, method) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["parents"] == ["one", "two"] and printed["weights"] == list(WEIGHTS)

    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "merged")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), folders[0],
                                          adapter_name="a")
    reference.load_adapter(folders[1], adapter_name="b")
    torch.manual_seed(0)  # the CLI's default --seed: DARE draws the same masks
    reference.add_weighted_adapter(["a", "b"], list(WEIGHTS), "m", combination_type=method,
                                   density=DENSITY if method in DENSITY_METHODS else None)
    reference.set_adapter("m")
    merged_logits = _logits(served.eval())
    assert torch.allclose(merged_logits, _logits(reference.eval()), atol=FP32_ATOL)
    with served.disable_adapter():
        assert not torch.allclose(merged_logits, _logits(served), atol=1e-3)  # the merge changes something

    manifest = read_manifest(tmp_path / "merged")
    assert (manifest.parents, manifest.weights, manifest.merge_method) == (("one", "two"), WEIGHTS, method)
    assert manifest.method == "lora" and manifest.task == "completion"
    assert [p["name"] for p in manifest.train_config["parents"]] == ["one", "two"]
    read_adapter_folder(tmp_path / "merged")  # the server reads it: hashes, config, weights


def test_cat_is_the_weighted_sum_of_deltas_whatever_ranks_targets_and_rslora(tmp_path, parents):
    folders = [parents["wide"], parents["one"]]  # an rsLoRA parent first: PEFT alone would scale by sqrt(r)
    assert _merge(tmp_path / "cat", folders, "cat") == 0
    merged = read_adapter_folder(tmp_path / "cat")
    assert merged.spec.r == 12 and not merged.spec.use_rslora
    wide, one = read_adapter_folder(folders[0]), read_adapter_folder(folders[1])
    assert set(merged.lora) == set(wide.lora) | set(one.lora)
    for module, weights in merged.lora.items():
        expected = sum(w * lora_delta(p.lora[module]) for w, p in zip(WEIGHTS, (wide, one)) if module in p.lora)
        assert torch.allclose(lora_delta(weights), expected, atol=FP32_ATOL), module


def test_svd_rank_sets_the_merged_rank(tmp_path, parents, capsys):
    assert _merge(tmp_path / "svd", [parents["one"], parents["wide"]], "svd", WEIGHTS, "--svd-rank", "2") == 0
    assert json.loads(capsys.readouterr().out)["rank"] == 2
    assert {w.rank for w in read_adapter_folder(tmp_path / "svd").lora.values()} == {2}


def _refused(capsys, code: int) -> str:
    assert code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear"])
def test_factor_methods_refuse_parents_of_other_ranks(tmp_path, parents, method, capsys):
    err = _refused(capsys, _merge(tmp_path / "m", [parents["one"], parents["wide"]], method))
    assert "combines the A and B factors" in err and "same rank" in err


def test_linear_refuses_parents_that_target_other_modules(tmp_path, tiny_llama_dir, parents, capsys):
    qk = save_peft_adapter(tiny_llama_dir, tmp_path / "qk", seed=4, target_modules=["q_proj", "k_proj"])
    err = _refused(capsys, _merge(tmp_path / "m", [parents["one"], qk], "linear"))
    assert "needs parents that target the same modules" in err and "'qk'" in err
    assert _merge(tmp_path / "c", [parents["one"], qk], "cat") == 0  # cat takes them


def test_parents_of_another_base_are_refused(tmp_path, parents, capsys):
    stranger = Path(shutil.copytree(parents["two"], tmp_path / "stranger"))
    write_manifest(stranger, Manifest(task="completion", base_name="other", base_fingerprint="0123456789abcdef"))
    err = _refused(capsys, _merge(tmp_path / "m", [parents["one"], stranger], "cat"))
    assert "'stranger'" in err and "other" in err and "fingerprint" in err
    assert not (tmp_path / "m").exists()


def test_non_lora_parents_are_refused(tmp_path, tiny_llama_dir, parents, capsys):
    ia3 = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                         IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "scaled")
    err = _refused(capsys, _merge(tmp_path / "m", [parents["one"], tmp_path / "scaled"], "cat"))
    assert "parent 'scaled' is a ia3 adapter; only LoRA adapters" in err


@pytest.mark.parametrize("extra, weights, message", [
    ((), (0.5,), "takes 2 to 16"),
    ((), (float("nan"), 1.0), "finite"),
    (("--density", "0.5"), WEIGHTS, "--density applies to"),
])
def test_bad_options_are_refused_before_anything_loads(tmp_path, parents, capsys, extra, weights, message):
    folders = [parents["one"], parents["two"]][: len(weights)]
    err = _refused(capsys, _merge(tmp_path / "m", folders, "cat", weights, *extra))
    assert message in err


def test_dare_needs_a_density_and_a_folder_once(tmp_path, parents, capsys):
    err = _refused(capsys, main(["merge", str(tmp_path / "m"), "--method", "dare_ties",
                                 "--adapter", f"{parents['one']}=1", "--adapter", f"{parents['two']}=1"]))
    assert "needs --density" in err
    err = _refused(capsys, _merge(tmp_path / "m", [parents["one"], parents["one"]], "cat"))
    assert "given twice" in err
