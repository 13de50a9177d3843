"""Quantized bases (`--quant int8|int4|nf4`): the kernels against the reference dequantized matmul, and every
served adapter method in one mixed batch on a quantized tiny Llama against the slow reference: an HF model
holding the dequantized weights (adapters.quantized) with PEFT (or the freeze tensors) on top."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, PrefixTuningConfig, TaskType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapters import resolve_base
from adapters.dense import TRAINED_WEIGHTS_FILE
from adapters.quantized import (DEFAULT_GROUP_SIZE, dequantize, dequantized_state_dict, quantize_int4, quantize_int8,
                                quantize_int8_channel, quantize_matrix, quantize_model, save_quantized)
from server.engine.backend import choose_backend
from server.engine.base_model import load_base
from server.engine.batch_runner import BatchRunner, RowInput
from server.engine.lora_layer import LoraLinear
from server.engine.quant_base import QuantEmbedding, QuantLoadError
from server.engine.quant_kernels import (DEQUANT_ROWS, QuantKernels, QuantUnavailableError, TorchInt4, TorchInt8,
                                         quant_kernels_for)
from tests.server.conftest import load_folder, make_peft_folder
from tests.server.test_freeze import make_freeze
from tests.server.test_ia3 import make_ia3

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "I like to eat", "Hello there"]
BF16_TOLERANCE = 2e-2  # relative to the output's scale: the torch kernels take bf16 activations
EXACT = 1e-4  # nf4: bitsandbytes' own kernel on both sides, fp32


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


# -- one matrix ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout_known", [True, False])
@pytest.mark.parametrize("rows", [1, 8, DEQUANT_ROWS + 4])
@pytest.mark.parametrize("kind", ["int8", "int4", "int8_channel"])
def test_kernel_matmul_equals_the_dequantized_reference(kind, rows, layout_known):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(128, 96, generator=generator) * 0.05
    bias = torch.randn(128, generator=generator)
    x = torch.randn(2, rows, 96, generator=generator)
    tensors = quantize_matrix(kind, weight, DEFAULT_GROUP_SIZE)
    reference = dequantize(kind, tensors, DEFAULT_GROUP_SIZE)
    kernels = QuantKernels("int8", "torch", layout_known=layout_known)  # the fallback (test_quant_native: the default)
    matrix = kernels.from_checkpoint(kind, tensors, DEFAULT_GROUP_SIZE)
    got = matrix.matmul(x, bias)
    assert got.shape == (2, rows, 128) and got.dtype == torch.float32
    assert _relative_error(got, x @ reference.t() + bias) < BF16_TOLERANCE
    assert _relative_error(matrix.dequantize(), reference) < BF16_TOLERANCE  # the packed layout read back
    ids = torch.tensor([[0, 31], [16, 127]])  # an embedding lookup: rows from both nibbles of two blocks
    torch.testing.assert_close(matrix.rows(ids, torch.float32), matrix.dequantize()[ids])


def test_int8_error_is_at_most_half_a_step_and_int4_clipping_never_loses_to_min_max():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 128, generator=generator)
    weight[0, 5] = 12.0  # an outlier: min/max rounding would coarsen its whole group
    q8 = quantize_int8_channel(weight)
    assert ((dequantize("int8_channel", q8) - weight).abs() <= q8["scales"][:, None] / 2 + 1e-6).all()
    g8 = quantize_int8(weight, 32)
    step = g8["scales"].repeat_interleave(32, dim=1)
    assert ((dequantize("int8", g8, 32) - weight).abs() <= step / 2 + 1e-6).all()
    q4 = quantize_int4(weight, 32)
    error = (dequantize("int4", q4, 32) - weight).pow(2).view(64, 4, 32).sum(-1)
    groups = weight.view(64, 4, 32)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    min_max = (torch.round((groups - low) / scale).clamp(0, 15) * scale + low - groups).pow(2).sum(-1)
    assert (error <= min_max + 1e-6).all() and (error < min_max - 1e-6).any()


def test_a_mode_this_machine_cannot_run_is_one_clear_error():
    with pytest.raises(QuantUnavailableError, match="--quant"):
        quant_kernels_for(torch.device("cpu"), "int3")


# -- a whole base -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def method_folders(tmp_path_factory, tiny_llama_dir, tiny_adapters) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant-methods")
    return {
        "alpha": tiny_adapters["alpha"],
        "ia3": make_ia3(tiny_llama_dir, root / "ia3", 41),
        "freeze": make_freeze(tiny_llama_dir, root / "freeze", 42, ["model.layers.1.mlp.down_proj"]),
        "prompt": make_peft_folder(tiny_llama_dir, root / "prompt", PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3), 43, "prompt_encoder", lambda p: p.normal_(0, 1.0)),
        "prefix": make_peft_folder(tiny_llama_dir, root / "prefix", PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=2), 44, "prompt_encoder", lambda p: p.normal_(0, 1.0)),
    }


@pytest.fixture(scope="module", params=["int8", "int4"])
def quant_base(request, tiny_llama_dir, cache_dir):
    prepared = resolve_base(str(tiny_llama_dir), cache_dir)
    return request.param, load_base(prepared, choose_backend("cpu", "float32", request.param), lora_slots=4)


def _reference(base_dir: Path, quant: str, folder: Path | None, name: str | None):
    """The slow, obviously-correct model: HF's own, holding the dequantized weights, the adapter on top."""
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if quant in ("int8", "int4"):
        model.load_state_dict(dequantized_state_dict(quantize_model(model, quant)), strict=False)
    if folder is None:
        return model
    if name == "freeze":
        model.load_state_dict(load_file(str(folder / TRAINED_WEIGHTS_FILE)), strict=False)
        return model
    return PeftModel.from_pretrained(model, folder).eval()


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_every_adapter_method_in_one_mixed_batch_on_a_quantized_base_equals_the_reference(
        quant_base, tiny_llama_dir, method_folders):
    quant, base = quant_base
    names = ["alpha", "ia3", None, "freeze", "prompt", "prefix"]
    loaded = {n: load_folder(f, base, n) for n, f in method_folders.items()}
    ids = [base.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(len(names))]
    virtual = {"prompt": 3, "prefix": 2}  # the folders' num_virtual_tokens
    prefill, decode_start = [], []
    for i, name in enumerate(names):
        adapter = loaded.get(name)
        if name == "prompt":  # placeholders whose embeddings the virtual tokens replace
            prefill.append(RowInput(i, 0, [0] * virtual[name] + ids[i], None, prompt=adapter))
        elif name == "prefix":  # keys and values at positions 0 .. V-1
            prefill.append(RowInput(i, virtual[name], ids[i], None, prompt=adapter))
        else:
            prefill.append(RowInput(i, 0, ids[i], adapter))
        decode_start.append(len(ids[i]) + virtual.get(name, 0))
    runner = BatchRunner(base, num_slots=len(names), max_len=64)
    logits = runner.forward(prefill)
    nxt = [int(row.argmax()) for row in logits]
    decoded = runner.forward([RowInput(i, decode_start[i], [nxt[i]], None if n in virtual else loaded.get(n))
                              for i, n in enumerate(names)])
    for row, name in enumerate(names):
        model = _reference(tiny_llama_dir, quant, method_folders.get(name), name)
        expected, expected_next = _last_logits(model, ids[row]), _last_logits(model, ids[row] + [nxt[row]])
        assert _relative_error(logits[row], expected) < BF16_TOLERANCE, (quant, name)
        assert _relative_error(decoded[row], expected_next) < BF16_TOLERANCE, (quant, name)
        if name is not None:  # the adapter moves the logits far more than the tolerance: the check has teeth
            plain = _last_logits(_reference(tiny_llama_dir, quant, None, None), ids[row])
            assert _relative_error(plain, expected) > 5 * BF16_TOLERANCE, name


def test_a_quantized_base_keeps_no_full_precision_weights(quant_base):
    quant, base = quant_base
    layers = [m for m in base.model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(m.base.weight is None for m in layers)
    assert isinstance(base.model.get_input_embeddings(), QuantEmbedding)
    full = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(base.prepared.path).parameters())
    # the tiny model is nearly all embedding, held 8-bit (1.125 bytes a value in groups of 64, 1.25 in an int4
    # checkpoint's groups of 32); smollm2's real ratios are benchmarks/bench_quant.py's
    assert base.weight_bytes < {"int8": 0.29, "int4": 0.32}[quant] * full, (quant, base.weight_bytes, full)


@pytest.fixture(scope="module")
def int4_folder(tiny_llama_dir, cache_dir, tmp_path_factory) -> Path:
    """A base-only int4 checkpoint of the tiny Llama, as `training export --format int4 --base-only` lays it out."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    prepared = resolve_base(str(tiny_llama_dir), cache_dir)
    folder = tmp_path_factory.mktemp("int4-base")
    model.config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama_dir / name).is_file():
            (folder / name).write_bytes((tiny_llama_dir / name).read_bytes())
    save_quantized(folder, model, quantize_model(model, "int4", source_name=prepared.name,
                                                  source_fingerprint=prepared.fingerprint))
    return folder


def test_a_quantized_folder_loads_without_quantizing_again_and_only_with_its_flag(tiny_llama_dir, cache_dir, int4_folder):
    prepared = resolve_base(str(tiny_llama_dir), cache_dir)
    assert json.loads((int4_folder / "quantization.json").read_text())["method"] == "int4"
    from_folder = resolve_base(str(int4_folder), cache_dir)
    assert from_folder.fingerprint == prepared.fingerprint  # a base-only export takes the base's adapters
    served = load_base(from_folder, choose_backend("cpu", "float32", "int4"), lora_slots=2)
    in_memory = load_base(prepared, choose_backend("cpu", "float32", "int4"), lora_slots=2)
    ids = served.tokenizer(PROMPTS[1])["input_ids"]
    rows = [RowInput(0, 0, ids, None)]
    torch.testing.assert_close(BatchRunner(served, 1, 32).forward(rows), BatchRunner(in_memory, 1, 32).forward(rows))
    for flag in ("none", "int8"):
        with pytest.raises(QuantLoadError, match="start it with --quant int4"):
            load_base(from_folder, choose_backend("cpu", "float32", flag), lora_slots=2)


def test_a_qlora_adapter_on_the_nf4_base_equals_peft_on_the_bitsandbytes_base_it_was_trained_on(
        tiny_llama_dir, tiny_adapters, cache_dir):
    pytest.importorskip("bitsandbytes")
    from training.methods.qlora import quantize_linears

    prepared = resolve_base(str(tiny_llama_dir), cache_dir)
    base = load_base(prepared, choose_backend("cpu", "float32", "nf4"), lora_slots=2)
    adapter = load_folder(tiny_adapters["alpha"], base, "alpha")
    ids = base.tokenizer(PROMPTS[0])["input_ids"]
    got = BatchRunner(base, 2, 64).forward([RowInput(0, 0, ids, adapter), RowInput(1, 0, ids, None)])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    quantize_linears(model, "nf4")  # exactly training's 4-bit base
    plain = _last_logits(model, ids)
    peft = PeftModel.from_pretrained(model, tiny_adapters["alpha"]).eval()
    torch.testing.assert_close(got[0], _last_logits(peft, ids), atol=EXACT, rtol=EXACT)
    torch.testing.assert_close(got[1], plain, atol=EXACT, rtol=EXACT)


def test_merge_on_a_quantized_base_and_bad_quant_flags_are_one_line_at_start_up(tiny_llama_dir, int4_folder, capsys,
                                                                                 monkeypatch):
    from server import cli

    monkeypatch.setattr(cli, "_leave_cores_to_workers", lambda: None)  # the test process keeps its threads
    assert cli.main(["serve", "--base", str(tiny_llama_dir), "--quant", "int8", "--merge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--merge with --quant int8" in err and "\n" not in err
    assert cli.main(["serve", "--base", str(int4_folder), "--quant", "int8", "--port", "0"]) == 2  # never serves
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "start it with --quant int4" in err and "\n" not in err
    main = cli.main
    with pytest.raises(SystemExit):  # argparse refuses a mode that does not exist
        main(["serve", "--quant", "int3"])


def test_an_int4_matrix_packs_and_reads_back_exactly_where_the_probe_says():
    weight = torch.randn(64, 64)
    tensors = quantize_int4(weight, 32)
    matrix = TorchInt4(**tensors, group_size=32)
    assert matrix.nbytes() < weight.numel() * 4 * 0.2
    int8 = TorchInt8(**quantize_int8(weight, 64), group_size=64)
    assert int8.nbytes() < weight.numel() * 4 * 0.3


CUDA_TOLERANCE = 5e-2  # bf16 activations and bitsandbytes' 8-bit / 4-bit kernels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant", ["int8", "int4", "nf4"])
def test_cuda_quantized_base_with_lora_equals_its_own_dequantized_weights(quant, tiny_llama_dir, tiny_adapters, cache_dir):
    """On CUDA every mode is bitsandbytes (LLM.int8, NF4): the served logits equal HF's model holding the
    weights those kernels dequantize to, with PEFT's adapter on top."""
    prepared = resolve_base(str(tiny_llama_dir), cache_dir)
    base = load_base(prepared, choose_backend("cuda", "float32", quant), lora_slots=2)
    adapter = load_folder(tiny_adapters["alpha"], base, "alpha")
    ids = base.tokenizer(PROMPTS[0])["input_ids"]
    got = BatchRunner(base, 1, 64).forward([RowInput(0, 0, ids, adapter)])[0].cpu()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    dequantized = {f"{name}.weight": layer.kernel_weight.dequantize().cpu()
                   for name, layer in base.model.named_modules() if isinstance(layer, LoraLinear)
                   and layer.base.weight is None}
    model.load_state_dict(dequantized, strict=False)
    expected = _last_logits(PeftModel.from_pretrained(model, tiny_adapters["alpha"]).eval(), ids)
    assert _relative_error(got, expected) < CUDA_TOLERANCE


def test_classification_adapters_on_an_int8_encoder_base_equal_the_dequantized_reference(tiny_bert_dir, tiny_classifiers,
                                                                                         cache_dir):
    from transformers import AutoModelForSequenceClassification

    from server.engine.classify import classify_rows

    base = load_base(resolve_base(str(tiny_bert_dir), cache_dir), choose_backend("cpu", "float32", "int8"))
    assert isinstance(base.model.get_input_embeddings(), QuantEmbedding)
    loaded = {n: load_folder(f, base, n) for n, f in tiny_classifiers.items()}
    texts = ["a fine film", "dull and far too long", "not bad at all"]
    names = ["two", "three", "two"]
    results = classify_rows(base, texts, [loaded[n] for n in names], max_length=32)
    for text, result, name in zip(texts, results, names):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=len(loaded[name].head.labels))
        model.load_state_dict(dequantized_state_dict(quantize_model(model, "int8")), strict=False)
        reference = PeftModel.from_pretrained(model, tiny_classifiers[name]).eval()
        with torch.no_grad():
            logits = reference(**base.tokenizer([text], return_tensors="pt")).logits[0]
        probs = torch.softmax(logits, dim=-1)
        assert (torch.tensor(list(result.probs.values())) - probs).abs().max() < BF16_TOLERANCE, name
