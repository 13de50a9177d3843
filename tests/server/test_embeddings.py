"""/v1/embeddings: OpenAI's shapes, sentence-transformers' pooling, per-row adapters in shared batches.

Unit tests run on the tiny BERT (random weights, MiniLM's tokenizer); the integration test runs the real
minilm-l6 through the stock `openai` client and compares with mean pooling done here with plain transformers.
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from server.api.app import create_app
from server.api.errors import ApiError
from server.config import ServerConfig
from server.engine.classify_batcher import ClassifyBatcher, ClassifyJob, EmbedJob
from server.engine.embed import EmbeddingSpec, embed_reference, embed_rows, embedding_spec, read_embedding_spec
from tests.conftest import TINY_HIDDEN
from tests.server.conftest import WAIT_S, load_folder

TEXTS = ["a wonderful, moving film", "dull and far too long", "meh", "The cat sat on the mat."]
ATOL = 1e-5
MIN_COSINE = 0.9999
EXAMPLE_ADAPTERS = Path(__file__).resolve().parents[2] / "examples" / "adapters"


def reference_mean_pooling(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """sentence-transformers' Pooling(mean) + Normalize, written out: [N, H]."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [N, S, H]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def vectors(response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return torch.tensor([d["embedding"] for d in response.json()["data"]])


# -- shapes and encodings ------------------------------------------------------------------------------

def test_response_shape_and_usage(bert_client):
    response = bert_client.post("/v1/embeddings", json={"model": "tiny-bert", "input": TEXTS})
    body = response.json()
    assert response.status_code == 200, response.text
    assert body["object"] == "list" and body["model"] == "tiny-bert"
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", i) for i in range(len(TEXTS))]
    assert all(len(d["embedding"]) == TINY_HIDDEN for d in body["data"])
    norms = vectors(response).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(len(TEXTS)), atol=1e-5, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(bert_client.app.state.loraplex.base.prepared.path)
    tokens = sum(len(ids) for ids in tokenizer(TEXTS)["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_single_string_and_base64_round_trip(bert_client):
    as_floats = vectors(bert_client.post("/v1/embeddings", json={"model": "two", "input": "great"}))
    response = bert_client.post("/v1/embeddings", json={"model": "two", "input": "great", "encoding_format": "base64"})
    assert response.status_code == 200, response.text
    encoded = response.json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert decoded.shape == (TINY_HIDDEN,)
    assert torch.equal(torch.from_numpy(decoded.copy()), as_floats[0])  # float32 both ways: bit for bit


def test_token_id_inputs_equal_text_inputs(bert_client):
    tokenizer = AutoTokenizer.from_pretrained(bert_client.app.state.loraplex.base.prepared.path)
    ids = tokenizer(TEXTS[:2])["input_ids"]  # with [CLS] ... [SEP]: token ids are taken as given
    from_text = vectors(bert_client.post("/v1/embeddings", json={"model": "two", "input": TEXTS[:2]}))
    from_ids = vectors(bert_client.post("/v1/embeddings", json={"model": "two", "input": ids}))
    one = vectors(bert_client.post("/v1/embeddings", json={"model": "two", "input": ids[0]}))
    torch.testing.assert_close(from_ids, from_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(one[0], from_text[0], atol=ATOL, rtol=0)


# -- what the vectors are ------------------------------------------------------------------------------

def test_base_equals_reference_mean_pooling(bert_client, tiny_bert_dir):
    served = vectors(bert_client.post("/v1/embeddings", json={"model": "tiny-bert", "input": TEXTS}))
    reference = reference_mean_pooling(AutoModel.from_pretrained(tiny_bert_dir).eval(),
                                       AutoTokenizer.from_pretrained(tiny_bert_dir), TEXTS)
    torch.testing.assert_close(served, reference, atol=ATOL, rtol=0)


def test_classification_adapter_changes_embedding_as_peft_does(bert_client, tiny_bert_dir, tiny_classifiers):
    base = vectors(bert_client.post("/v1/embeddings", json={"model": "tiny-bert", "input": TEXTS}))
    served = vectors(bert_client.post("/v1/embeddings", json={"model": "two", "input": TEXTS}))
    assert torch.nn.functional.cosine_similarity(served, base).max() < 0.99  # the adapter's layers are applied
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    peft_model = PeftModel.from_pretrained(model, tiny_classifiers["two"]).eval()
    reference = reference_mean_pooling(peft_model.base_model.model.bert, AutoTokenizer.from_pretrained(tiny_bert_dir),
                                       TEXTS)  # the backbone with the adapter's LoRA layers, its head unused
    torch.testing.assert_close(served, reference, atol=ATOL, rtol=0)


def test_mixed_adapters_in_one_forward_equal_each_alone(tiny_bert_base, tiny_classifiers):
    two, three = (load_folder(tiny_classifiers[n], tiny_bert_base, n) for n in ("two", "three"))
    spec = embedding_spec(tiny_bert_base)
    ids = tiny_bert_base.tokenizer(TEXTS)["input_ids"]
    rows = [two, None, three, two]
    mixed = embed_rows(tiny_bert_base, ids, rows, spec)
    assert mixed.shape == (len(TEXTS), TINY_HIDDEN) and mixed.dtype == torch.float32
    for i, adapter in enumerate(rows):
        alone = embed_rows(tiny_bert_base, ids[i:i + 1], [adapter], spec)[0]
        torch.testing.assert_close(mixed[i], alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(mixed[i], embed_reference(tiny_bert_base, ids[i], adapter, spec), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_other_poolings_equal_the_reference(tiny_bert_base, tiny_classifiers, pooling):
    two = load_folder(tiny_classifiers["two"], tiny_bert_base, "two")
    spec = EmbeddingSpec(dimensions=TINY_HIDDEN, max_length=128, pooling=pooling, normalize=pooling == "cls")
    ids = tiny_bert_base.tokenizer(TEXTS)["input_ids"]
    mixed = embed_rows(tiny_bert_base, ids, [two, None, two, None], spec)
    for i, adapter in enumerate([two, None, two, None]):
        torch.testing.assert_close(mixed[i], embed_reference(tiny_bert_base, ids[i], adapter, spec), atol=ATOL, rtol=0)


def test_batcher_takes_both_kinds_of_work_in_one_step(tiny_bert_base, tiny_classifiers):
    """Queued before the thread starts, so one step takes them all: one classify and one embed forward."""
    two, three = (load_folder(tiny_classifiers[n], tiny_bert_base, n) for n in ("two", "three"))
    batches: list[tuple[str, int]] = []
    batcher = ClassifyBatcher(tiny_bert_base, threading.Lock(), 64, 32, on_batch=lambda p, n: batches.append((p, n)))
    ids = tiny_bert_base.tokenizer(TEXTS)["input_ids"]
    outcomes: dict[str, object] = {}
    finished = threading.Event()

    def keep(key):
        def done(outcome):
            outcomes[key] = outcome
            if len(outcomes) == 4:
                finished.set()
        return done

    batcher.submit(EmbedJob(ids[:2], two, keep("two")))
    batcher.submit(ClassifyJob(TEXTS[:1], three, keep("classify")))
    batcher.submit(EmbedJob(ids[2:], three, keep("three")))
    batcher.submit(EmbedJob(ids, None, keep("base")))
    batcher.start()
    try:
        assert finished.wait(WAIT_S)
    finally:
        batcher.stop()
    assert sorted(batches) == [("classify", 1), ("embed", 2 + 2 + len(TEXTS))]
    spec = batcher.embedding
    assert len(outcomes["classify"]) == 1 and len(outcomes["classify"][0].probs) == 3
    for key, adapter, rows in [("two", two, ids[:2]), ("three", three, ids[2:]), ("base", None, ids)]:
        alone = embed_rows(tiny_bert_base, rows, [adapter] * len(rows), spec)
        torch.testing.assert_close(outcomes[key], alone, atol=ATOL, rtol=0)


def test_concurrent_requests_with_different_adapters(bert_client):
    from concurrent.futures import ThreadPoolExecutor

    def call(name):
        return vectors(bert_client.post("/v1/embeddings", json={"model": name, "input": TEXTS}))

    alone = {name: call(name) for name in ("two", "three", "tiny-bert")}
    with ThreadPoolExecutor(6) as pool:
        names = ["two", "three", "tiny-bert"] * 2
        results = list(pool.map(call, names))
    for name, got in zip(names, results):
        torch.testing.assert_close(got, alone[name], atol=ATOL, rtol=0)


# -- refusals ------------------------------------------------------------------------------------------

LONG_TEXT = "word " * 200  # the tiny BERT embeds at most 128 tokens (its max_position_embeddings)


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "nope", "input": "x"}, 404, "does not exist"),
    ({"model": "two", "input": []}, 400, "at least one"),
    ({"model": "two", "input": ["ok", ""]}, 400, "empty strings"),
    ({"model": "two", "input": ""}, 400, "empty strings"),
    ({"model": "two", "input": [[101, 102], []]}, 400, "empty token list"),
    ({"model": "two", "input": ["x"] * 65}, 400, "--max-classify-batch"),
    ({"model": "two", "input": ["short", LONG_TEXT]}, 400, "input 1 is"),
    ({"model": "two", "input": [101] * 129}, 400, "at most 128 tokens"),
    ({"model": "two", "input": [101, 10 ** 9]}, 400, "outside this model's vocabulary"),
    ({"model": "two", "input": [101, -1]}, 400, "outside this model's vocabulary"),
    ({"model": "two", "input": [True, False]}, 400, "input"),
    ({"model": "two", "input": ["a", 1]}, 400, "input"),
    ({"model": "two", "input": "x", "dimensions": 32}, 400, "dimensions 32 is not served"),
    ({"model": "two", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "two", "input": "x", "truncate": True}, 400, "unrecognized request argument"),
    ({"model": "two"}, 400, "input"),
])
def test_bad_embedding_requests(bert_client, body, status, needle):
    response = bert_client.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]
    assert bert_client.post("/v1/embeddings", json={"model": "two", "input": "ok"}).status_code == 200


def test_dimensions_param_is_named_and_own_size_accepted(bert_client):
    refused = bert_client.post("/v1/embeddings", json={"model": "two", "input": "x", "dimensions": 8}).json()
    assert refused["error"]["param"] == "dimensions" and str(TINY_HIDDEN) in refused["error"]["message"]
    own = bert_client.post("/v1/embeddings", json={"model": "two", "input": "x", "dimensions": TINY_HIDDEN,
                                                  "encoding_format": None, "user": "u1"})
    assert own.status_code == 200 and len(own.json()["data"][0]["embedding"]) == TINY_HIDDEN


def test_causal_lm_base_refuses_embeddings(llama_client):
    response = llama_client.post("/v1/embeddings", json={"model": "tiny", "input": "hi"})
    assert response.status_code == 400
    assert "is a causal LM; /v1/embeddings needs an encoder base" in response.json()["error"]["message"]


@pytest.mark.parametrize("options,needle", [
    ({"backend": "onnxruntime", "base": "minilm-l6"}, "onnxruntime"),
    ({"merge": True, "base": "minilm-l6"}, "--merge"),
])
def test_backends_without_embeddings_refuse(options, needle):
    from server.api.routes_embed import _served_spec

    state = SimpleNamespace(config=ServerConfig(**options), base=SimpleNamespace(can_generate=False),
                            served_name="minilm-l6", classifier=SimpleNamespace(embedding=None))
    with pytest.raises(ApiError) as refused:
        _served_spec(state)
    assert refused.value.status == 400 and needle in refused.value.message


def test_api_key_and_metrics(tmp_path, tiny_bert_base, tiny_classifiers):
    config = ServerConfig(base=str(tiny_bert_base.prepared.path), served_name="tiny-bert", api_key="k1",
                          adapters={"two": str(tiny_classifiers["two"])}, state_dir=tmp_path / "state",
                          admin_token="test-token")
    with TestClient(create_app(config, base=tiny_bert_base)) as client:
        body = {"model": "two", "input": ["a", "b"]}
        assert client.post("/v1/embeddings", json=body).status_code == 401
        assert client.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer k1"}).status_code == 200
        text = client.get("/metrics").text
    assert 'loraplex_requests_total{adapter="two",route="/v1/embeddings",status="200"} 1.0' in text
    assert 'loraplex_batch_size_count{phase="embed"} 1.0' in text
    assert 'loraplex_embedded_inputs_total{adapter="two"} 2.0' in text


# -- the sentence-transformers pipeline a folder describes -------------------------------------------------

def _st_folder(root: Path, modules: list[str], pooling: dict, max_seq_length: int | None = 200) -> Path:
    root.mkdir()
    types = {"T": "sentence_transformers.models.Transformer", "P": "sentence_transformers.models.Pooling",
             "N": "sentence_transformers.models.Normalize", "D": "sentence_transformers.models.Dense"}
    entries = [{"idx": i, "name": str(i), "path": "1_Pooling" if m == "P" else "", "type": types[m]}
               for i, m in enumerate(modules)]
    (root / "modules.json").write_text(json.dumps(entries))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if max_seq_length is not None:
        (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return root


MEAN = {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}


@pytest.mark.parametrize("modules,pooling,max_seq,want", [
    ("TPN", MEAN, 200, dict(pooling="mean", normalize=True, max_length=200, unsupported=None)),
    ("TP", {"pooling_mode_cls_token": True}, 1000, dict(pooling="cls", normalize=False, max_length=512)),
    ("TPN", {"pooling_mode": "max"}, None, dict(pooling="max", max_length=512, unsupported=None)),
    ("TPDN", MEAN, 200, dict(unsupported="modules")),
    ("TPN", {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, 200, dict(unsupported="pooling")),
    ("TPN", {"pooling_mode_weightedmean_tokens": True}, 200, dict(unsupported="pooling")),
])
def test_read_embedding_spec(tmp_path, modules, pooling, max_seq, want):
    spec = read_embedding_spec(_st_folder(tmp_path / "st", list(modules), pooling, max_seq), 384, 512)
    want = dict(want)
    reason = want.pop("unsupported", None)
    if reason is None:
        assert spec.unsupported is None
    else:
        assert reason in spec.unsupported
    assert {field: getattr(spec, field) for field in want} == want


def test_read_embedding_spec_defaults_and_broken_files(tmp_path, minilm_base):
    plain = read_embedding_spec(tmp_path, 64, 128)  # no sentence-transformers files: mean + normalize
    assert (plain.pooling, plain.normalize, plain.max_length, plain.unsupported) == ("mean", True, 128, None)
    real = read_embedding_spec(minilm_base.path, 384, 512)  # all-MiniLM-L6-v2: Pooling(mean) -> Normalize, 256
    assert (real.pooling, real.normalize, real.max_length, real.unsupported) == ("mean", True, 256, None)
    (tmp_path / "modules.json").write_text("{not json")
    assert "cannot be read" in read_embedding_spec(tmp_path, 64, 128).unsupported


# -- the real minilm-l6, through the stock openai client ------------------------------------------------------

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome and I loved every minute of it.",
    "The weather in Paris is rainy today",
    "Quantum computers use qubits.",
    "dull, lifeless and far too long",
    "Two dogs play in the snow while their owner watches from the porch.",
]


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory, minilm_base):
    from openai import OpenAI

    from server.engine.base_model import load_base
    from tests.server.conftest import CPU_FP32

    base = load_base(minilm_base, CPU_FP32)
    config = ServerConfig(base=str(minilm_base.path), served_name="minilm-l6", api_key="sk-test",
                          adapters={"sentiment": str(EXAMPLE_ADAPTERS / "sentiment")},
                          state_dir=tmp_path_factory.mktemp("state"), admin_token="test-token")
    with TestClient(create_app(config, base=base)) as http:
        yield OpenAI(base_url="http://testserver/v1", api_key="sk-test", http_client=http, max_retries=0)


def _cosines(got: list[list[float]], want: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.tensor(got, dtype=torch.float32), want.float())


@pytest.mark.integration
def test_minilm_embeddings_equal_sentence_transformers_pooling(minilm_server, minilm_base):
    tokenizer = AutoTokenizer.from_pretrained(minilm_base.path)
    reference = reference_mean_pooling(AutoModel.from_pretrained(minilm_base.path).eval(), tokenizer, SENTENCES)
    as_floats = minilm_server.embeddings.create(model="minilm-l6", input=SENTENCES, encoding_format="float")
    by_default = minilm_server.embeddings.create(model="minilm-l6", input=SENTENCES)  # client asks base64, decodes
    explicit = minilm_server.embeddings.create(model="minilm-l6", input=SENTENCES[0], encoding_format="base64")
    assert len(as_floats.data[0].embedding) == 384
    assert as_floats.usage.prompt_tokens == sum(len(ids) for ids in tokenizer(SENTENCES)["input_ids"])
    float_cos = _cosines([d.embedding for d in as_floats.data], reference)
    default_cos = _cosines([d.embedding for d in by_default.data], reference)
    decoded = np.frombuffer(base64.b64decode(explicit.data[0].embedding), dtype="<f4")
    print(f"minilm-l6 cosine vs reference: float min {float_cos.min():.7f}, base64 min {default_cos.min():.7f}")
    assert float_cos.min() >= MIN_COSINE and default_cos.min() >= MIN_COSINE
    alone = minilm_server.embeddings.create(model="minilm-l6", input=SENTENCES[0], encoding_format="float")
    assert np.array_equal(decoded, np.asarray(alone.data[0].embedding, dtype=np.float32))  # same batch: bit for bit


@pytest.mark.integration
def test_minilm_adapter_embeddings_equal_peft_backbone(minilm_server, minilm_base):
    tokenizer = AutoTokenizer.from_pretrained(minilm_base.path)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_base.path, num_labels=2)
    peft_model = PeftModel.from_pretrained(model, EXAMPLE_ADAPTERS / "sentiment").eval()
    reference = reference_mean_pooling(peft_model.base_model.model.bert, tokenizer, SENTENCES)
    served = minilm_server.embeddings.create(model="sentiment", input=SENTENCES, encoding_format="float")
    base = minilm_server.embeddings.create(model="minilm-l6", input=SENTENCES, encoding_format="float")
    adapter_cos = _cosines([d.embedding for d in served.data], reference)
    moved = _cosines([d.embedding for d in served.data], torch.tensor([d.embedding for d in base.data]))
    print(f"sentiment adapter cosine vs PEFT reference: min {adapter_cos.min():.7f}; vs base: max {moved.max():.5f}")
    assert adapter_cos.min() >= MIN_COSINE
    assert moved.max() < MIN_COSINE  # the adapter's layers change the embedding


def test_fuzz_embeddings_on_the_bert_app(tmp_path, tiny_bert_base, tiny_classifiers):
    """Schema-valid and -invalid bodies (schemathesis, as test_fuzz.py runs the other routes): no 5xx, and every
    answer is one the schema documents."""
    from tests.server.test_fuzz import _fuzz

    config = ServerConfig(base=str(tiny_bert_base.prepared.path), served_name="tiny-bert", state_dir=tmp_path / "state",
                          adapters={name: str(path) for name, path in tiny_classifiers.items()},
                          admin_token="test-token")
    failures = _fuzz(create_app(config, base=tiny_bert_base), {"/v1/embeddings"}, ("tiny-bert", "two", "three"))
    assert not failures, "\n\n".join(f"== {op}\n{text}" for op, text in failures.items())


# -- a stock PEFT FEATURE_EXTRACTION adapter (LoRA on the bare encoder) ----------------------------------

@pytest.fixture(scope="module")
def feature_adapter(tmp_path_factory, tiny_bert_dir) -> Path:
    """What PEFT (and sentence-transformers' PEFT support) saves for a bare `BertModel`: module names
    relative to it (`encoder.layer.0...`, no `bert.`), task_type FEATURE_EXTRACTION."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="FEATURE_EXTRACTION",
                        init_lora_weights=False)
    model = get_peft_model(AutoModel.from_pretrained(tiny_bert_dir), config)
    with torch.no_grad():  # PEFT's random init barely moves the embedding; make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("feature") / "feature"
    model.save_pretrained(out)
    return out


def test_feature_extraction_adapter_serves_embeddings_as_peft_does(tmp_path, tiny_bert_base, tiny_bert_dir,
                                                                    feature_adapter):
    config = ServerConfig(base=str(tiny_bert_base.prepared.path), served_name="tiny-bert",
                          adapters={"feature": str(feature_adapter)}, state_dir=tmp_path / "state",
                          admin_token="test-token")
    with TestClient(create_app(config, base=tiny_bert_base)) as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["feature"]["task"] == "embedding"
        served = vectors(client.post("/v1/embeddings", json={"model": "feature", "input": TEXTS}))
        base = vectors(client.post("/v1/embeddings", json={"model": "tiny-bert", "input": TEXTS}))
        refused = client.post("/v1/classify", json={"model": "feature", "input": "x"})
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert_dir), feature_adapter).eval()
    reference = reference_mean_pooling(peft_model, AutoTokenizer.from_pretrained(tiny_bert_dir), TEXTS)
    torch.testing.assert_close(served, reference, atol=ATOL, rtol=0)
    assert torch.nn.functional.cosine_similarity(served, base).max() < 0.99
    assert refused.status_code == 400 and "use /v1/embeddings" in refused.json()["error"]["message"]


def test_feature_extraction_adapter_is_refused_on_a_causal_base(llama_client, feature_adapter):
    response = llama_client.post("/admin/adapters", headers={"Authorization": "Bearer test-token"},
                                 json={"name": "feature", "path": str(feature_adapter)})
    assert response.status_code == 400, response.text
