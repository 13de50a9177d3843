"""Per-request adapter combinations (`"model": "a:0.7+b:-0.3"`): each row of a mixed batch equals its own
reference; a combination equals the `cat` merge of its parents served as one adapter (1e-5, fp32); bad
combinations are a 400 naming `model`; a combination holds its parents and counts each toward --max-loras."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from peft import IA3Config, LoraConfig, TaskType, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from adapters import LoraWeights
from server.api.app import create_app
from server.api.combination import COMBINATION_LABEL, parse_combination
from server.api.errors import ApiError
from server.api.routes_generate import VERSION_HEADER, _acquire_combination
from server.config import ServerConfig
from server.engine.loaded import Combination, LoadedAdapter
from server.engine.lora_layer import ActiveAdapters, LoraLinear
from server.engine.lora_slots import LoraSlots
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler, SchedulerLimits
from tests.server.conftest import ADMIN, load_folder
from training.merge import MergeOptions, MergeParent, merge_adapters

FP32_ATOL = 1e-5
WEIGHTS = (0.7, -0.3)
COMBINED = "alpha:0.7+beta:-0.3"
CPU = torch.device("cpu")


# -- the kernels, on plain layers: every path against an fp32 loop over each row's parts ------------------

MODULES = {"q": (24, 16), "v": (8, 16)}  # name -> (out, in)


def _adapter(name: str, rank: int, targets: list[str], gen: torch.Generator) -> LoadedAdapter:
    lora = {m: LoraWeights(a=torch.randn(rank, MODULES[m][1], generator=gen),
                           b=torch.randn(MODULES[m][0], rank, generator=gen), scaling=0.5 + rank / 8)
            for m in targets}
    return LoadedAdapter(name=name, version=1, task="completion", source=None, rank=rank, lora=lora)


def _reference(layer: nn.Linear, name: str, x: torch.Tensor, rows: list) -> torch.Tensor:
    """Row by row: base(x) + sum over the row's parts of weight * scaling * B A x."""
    out = layer(x).clone()
    for row, model in enumerate(rows):
        for adapter, weight in model.lora_parts if model is not None else ():
            w = adapter.lora.get(name)
            if w is not None:
                out[row] += weight * w.scaling * (x[row] @ w.a.T @ w.b.T)
    return out


@pytest.mark.parametrize("kernel, seq, per_row", [
    ("loop", 1, None), ("loop", 3, None), ("stacked", 3, None), ("stacked", 1, True), ("stacked", 1, False),
])
def test_every_kernel_sums_the_weighted_deltas_of_a_rows_parts(kernel, seq, per_row):
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    pool = [_adapter("a", 4, ["q", "v"], gen), _adapter("b", 8, ["q"], gen), _adapter("c", 2, ["v"], gen)]
    combos = [Combination(((pool[0], 0.7), (pool[1], -0.3))), Combination(((pool[2], 2.0), (pool[1], 0.5),
                                                                          (pool[0], 1.0)))]
    if per_row is False:  # many rows on few adapters: the masked kernel
        rows = [combos[0]] * 4 + [pool[0]] * 3 + [None, combos[1]]
    else:
        rows = [combos[0], pool[1], None, combos[1], pool[2]]
    rng.shuffle(rows)
    active = ActiveAdapters(LoraSlots(4, MODULES, CPU, torch.float32) if kernel == "stacked" else None)
    for name, (out_features, in_features) in MODULES.items():
        base = nn.Linear(in_features, out_features)
        layer = LoraLinear(base, name, active)
        x = torch.randn(len(rows), seq, in_features, generator=gen)
        active.set_rows(rows, CPU)
        if per_row is not None:
            assert active.per_row is per_row
        with torch.no_grad():
            torch.testing.assert_close(layer(x), _reference(base, name, x, rows), atol=FP32_ATOL, rtol=FP32_ATOL)
        active.clear()


def test_per_row_buffers_follow_a_row_that_changes_combination():
    gen = torch.Generator().manual_seed(1)
    a, b = _adapter("a", 4, ["q"], gen), _adapter("b", 4, ["q"], gen)
    active = ActiveAdapters(LoraSlots(4, MODULES, CPU, torch.float32))
    base = nn.Linear(16, 24)
    layer = LoraLinear(base, "q", active)
    x = torch.randn(2, 1, 16, generator=gen)
    for rows in ([Combination(((a, 1.0), (b, 1.0))), b], [a, Combination(((b, 0.25),))], [a, b]):
        active.set_rows(rows, CPU)
        assert active.per_row
        with torch.no_grad():
            torch.testing.assert_close(layer(x), _reference(base, "q", x, rows), atol=FP32_ATOL, rtol=FP32_ATOL)
        active.clear()


# -- the tiny Llama: combination == the cat merge served as one, in a batch with other rows ----------------

@pytest.fixture(scope="module")
def cat_folder(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_adapters) -> Path:
    """`training merge --method cat` of alpha (rank 4) and beta (rank 8, rsLoRA, other targets)."""
    out = tmp_path_factory.mktemp("compose") / "alpha-beta-cat"
    parents = (MergeParent(tiny_adapters["alpha"], WEIGHTS[0]), MergeParent(tiny_adapters["beta"], WEIGHTS[1]))
    merge_adapters(MergeOptions(out=out, parents=parents, method="cat", base=str(tiny_llama_dir)))
    return out


@pytest.fixture(scope="module")
def loaded(tiny_llama_base, tiny_adapters, cat_folder) -> dict[str, LoadedAdapter]:
    adapters = {name: load_folder(path, tiny_llama_base, name) for name, path in tiny_adapters.items()}
    adapters["cat"] = load_folder(cat_folder, tiny_llama_base, "cat")
    return adapters


@torch.no_grad()
def _logits(base, rows: list, ids: torch.Tensor) -> torch.Tensor:
    with base.adapters_for_rows(rows):
        layout = base.active.per_row
        logits = base.model(input_ids=ids.expand(len(rows), -1)).logits
    return logits, layout


@pytest.mark.parametrize("layout", ["prefill", "per_row", "masked", "loop"])
def test_mixed_batch_rows_equal_their_references(tiny_llama_base, tiny_llama_base_loop, loaded, layout):
    alpha, beta, cat = loaded["alpha"], loaded["beta"], loaded["cat"]
    combo = Combination(((alpha, WEIGHTS[0]), (beta, WEIGHTS[1])))
    if layout == "masked":  # many rows on three adapters
        rows = [combo, combo, alpha, alpha, alpha, None, cat, cat, beta]
    else:
        rows = [combo, alpha, None, cat, beta]
    base = tiny_llama_base_loop if layout == "loop" else tiny_llama_base
    ids = torch.tensor([[1, 28, 504, 9, 77]]) if layout in ("prefill", "loop") else torch.tensor([[404]])
    logits, per_row = _logits(base, rows, ids)
    if layout in ("per_row", "masked"):
        assert per_row is (layout == "per_row")
    reference = {}
    for model in (alpha, beta, cat, None):
        reference[id(model)] = _logits(tiny_llama_base_loop, [model], ids)[0][0]
    combo_row = logits[rows.index(combo)]
    torch.testing.assert_close(combo_row, reference[id(cat)], atol=FP32_ATOL, rtol=0)  # the cat merge, as one
    for row, model in enumerate(rows):
        expected = reference[id(cat)] if model is combo else reference[id(model)]
        torch.testing.assert_close(logits[row], expected, atol=FP32_ATOL, rtol=0)
    assert (combo_row - reference[id(alpha)]).abs().max() > 1e-2  # both parents matter
    assert (combo_row - reference[id(None)]).abs().max() > 1e-2


# -- HTTP ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_kinds(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    """An IA3 adapter and a classification LoRA on the tiny Llama: neither can be a combination's parent."""
    root = tmp_path_factory.mktemp("compose-others")
    ia3 = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                         IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(root / "scaled")
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2)
    classifier.config.pad_token_id = classifier.config.eos_token_id
    get_peft_model(classifier, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(root / "sentiment")
    return {"scaled": root / "scaled", "sentiment": root / "sentiment"}


def _client(tmp_path: Path, base, adapters: dict[str, Path], **config) -> TestClient:
    settings = ServerConfig(
        base=str(base.prepared.path), served_name="tiny", adapters={n: str(p) for n, p in adapters.items()},
        state_dir=tmp_path / "state", admin_token="test-token", max_model_len=256, max_tokens_limit=64,
        adapter_roots=[tmp_path.parent], **config)
    return TestClient(create_app(settings, base=base))


@pytest.fixture
def client(tmp_path, tiny_llama_base, tiny_adapters, cat_folder, other_kinds):
    adapters = {**tiny_adapters, "cat": cat_folder, **other_kinds}
    with _client(tmp_path, tiny_llama_base, adapters) as test_client:
        yield test_client


def _versions(client: TestClient) -> dict[str, int]:
    return {e.name: e.version for e in client.app.state.loraplex.registry.entries()}


def _holds(client: TestClient) -> int:
    return sum(client.app.state.loraplex.registry._holds.values())  # noqa: SLF001: what a request still holds


def test_a_combination_answers_as_its_cat_merge_served_as_one(client):
    body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    combined = client.post("/v1/completions", json={**body, "model": COMBINED})
    merged = client.post("/v1/completions", json={**body, "model": "cat"})
    alone = client.post("/v1/completions", json={**body, "model": "alpha"})
    assert combined.status_code == 200, combined.text
    assert combined.json()["choices"][0]["text"] == merged.json()["choices"][0]["text"]
    assert combined.json()["choices"][0]["text"] != alone.json()["choices"][0]["text"]
    assert combined.json()["model"] == COMBINED
    versions = _versions(client)
    assert combined.headers[VERSION_HEADER] == f"alpha={versions['alpha']},beta={versions['beta']}"
    chat = {"model": COMBINED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as streamed:
        assert streamed.status_code == 200 and streamed.headers[VERSION_HEADER] == combined.headers[VERSION_HEADER]
        assert streamed.read().endswith(b"data: [DONE]\n\n")
    assert _holds(client) == 0
    assert f'adapter="{COMBINATION_LABEL}"' in client.get("/metrics").text


@pytest.mark.parametrize("model, message", [
    ("alpha:0.7+nobody:0.3", "no adapter is called 'nobody'"),
    ("alpha:nan", "must be a decimal number"),
    ("alpha:1e999", "must be finite"),
    ("alpha:0.5+alpha:0.5", "more than once"),
    ("alpha:0.5+", "needs an adapter name"),
    ("alpha:0.5+b@d:1", "may only use letters"),
    ("+".join(f"a{i}" for i in range(9)), "at most 8"),
    ("alpha:0.5+scaled:0.5", "'scaled' is an IA3 adapter"),
    ("alpha:0.5+sentiment:0.5", "'sentiment' is a classification adapter"),
    ("alpha:0.5+tiny:1", "is the base, not an adapter"),
])
def test_bad_combinations_are_a_400_naming_model(client, model, message):
    answer = client.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "model" and message in error["message"], error
    assert _holds(client) == 0  # the parents held before the refusal are released


def test_classify_refuses_a_combination(client):
    answer = client.post("/v1/classify", json={"model": "sentiment:0.5+alpha:0.5", "input": "great"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "model"
    assert "/v1/completions" in answer.json()["error"]["message"]


def test_merge_mode_refuses_and_max_loras_bounds_a_combination(tmp_path, tiny_llama_base, tiny_adapters):
    request = {"model": "alpha:0.5+beta:0.5", "prompt": "Hi", "max_tokens": 2}
    with _client(tmp_path, tiny_llama_base, tiny_adapters, merge=True) as merged:
        answer = merged.post("/v1/completions", json=request)
        assert answer.status_code == 400 and "--merge mode" in answer.json()["error"]["message"]
    with _client(tmp_path, tiny_llama_base, tiny_adapters, max_loras=1) as narrow:
        answer = narrow.post("/v1/completions", json=request)
        assert answer.status_code == 400 and "at most 1" in answer.json()["error"]["message"]
        assert narrow.post("/v1/completions", json={**request, "model": "alpha:0.5"}).status_code == 200


def test_a_combination_holds_its_parents_versions_and_memory(tmp_path, tiny_llama_base, tiny_adapters, cat_folder):
    adapters = {**tiny_adapters, "cat": cat_folder}
    with _client(tmp_path, tiny_llama_base, adapters, max_cpu_loras=1) as test_client:
        state = test_client.app.state.loraplex
        registry = state.registry
        combo = asyncio.run(state.acquire_combination(COMBINED, parse_combination(COMBINED)))
        alpha = combo.parts[0][0]
        assert registry.resolve("cat").name == "cat"  # read, used, released: the one over the budget that goes
        assert registry.is_resident("alpha") and registry.is_resident("beta")  # held: kept past a budget of 1
        assert not registry.is_resident("cat")
        replaced = test_client.post("/admin/adapters", headers=ADMIN,
                                    json={"name": "alpha", "path": str(cat_folder), "replace": True})
        assert replaced.status_code == 200, replaced.text
        assert combo.parts[0][0] is alpha and alpha.version != _versions(test_client)["alpha"]
        state.release_model(combo)
        assert _holds(test_client) == 0 and registry.resident_count() == 1  # released: back within the budget


def test_admission_counts_each_parent_toward_max_loras(tiny_llama_base, loaded):
    scheduler = Scheduler(tiny_llama_base, SchedulerLimits(max_running=4, max_len=64, max_adapters_per_batch=2),
                          threading.Lock())
    combo = Combination(((loaded["alpha"], 0.5), (loaded["beta"], 0.5)))

    def submit(model) -> GenerationRequest:
        request = GenerationRequest([1, 2, 3], SamplingParams(max_tokens=2), model, emit=lambda item: None)
        scheduler.submit(request)
        return request

    first, blocked, third = submit(combo), submit(loaded["cat"]), submit(loaded["alpha"])
    assert [r.request for r in scheduler._admit()] == [first]  # noqa: SLF001: cat would be a third adapter
    scheduler._running.clear()  # noqa: SLF001: the combination finished
    assert [r.request for r in scheduler._admit()] == [blocked, third]  # noqa: SLF001: cat and alpha: two


def test_the_onnxruntime_backend_refuses_combinations():
    state = SimpleNamespace(config=SimpleNamespace(merge=False, backend="onnxruntime", max_loras=32))
    with pytest.raises(ApiError, match="serves merged exports") as refused:
        asyncio.run(_acquire_combination(state, COMBINED))
    assert refused.value.status == 400 and refused.value.param == "model"
