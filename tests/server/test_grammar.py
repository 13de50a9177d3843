"""Structured output (server/engine/grammar.py): sampling under a GrammarProcessor yields JSON that parses and
validates; the mask agrees with the matcher token by token; bad or oversized schemas are refused with a
ValueError naming response_format; only EOS once the grammar is complete; padded logits; the cache."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from server.engine.grammar import (
    JSON_SEPARATORS,
    MAX_REPEAT_BOUND,
    MAX_SCHEMA_BYTES,
    MAX_STRING_LENGTH_BOUNDS,
    GrammarCompiler,
    GrammarProcessor,
    ResponseFormat,
    apply_bitmask_reference,
)

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                             "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "address"],
}
ENUM = {
    "type": "object",
    "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}, "score": {"type": "number"}},
    "required": ["sentiment", "score"],
}
ARRAY = {
    "type": "array",
    "items": {"type": "object", "properties": {"id": {"type": "integer"}, "done": {"type": "boolean"},
                                               "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
              "required": ["id", "done"]},
    "minItems": 1,
    "maxItems": 4,
}
RECURSIVE = {
    "$defs": {"node": {"type": "object", "properties": {"label": {"type": "string", "maxLength": 8},
                                                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                                     "maxItems": 2}},
                       "required": ["label"]}},
    "$ref": "#/$defs/node",
}
SCHEMAS = {"nested": NESTED, "enum": ENUM, "array": ARRAY, "recursive": RECURSIVE}
CLOSING_BIAS = 6.0  # random logits wander inside strings forever; favour tokens that close them
PADDED_WIDTH = 49_280  # a logits row padded past SmolLM2's 49,152 tokens, as many heads are


def nested_lists(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "test", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def tokenizer(smollm2_base):
    return AutoTokenizer.from_pretrained(smollm2_base.path)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


@pytest.fixture(scope="module")
def closing_bias(tokenizer) -> torch.Tensor:
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([CLOSING_BIAS if any(c in p for c in '"}]') else 0.0 for p in pieces])


def sample_under(processor: GrammarProcessor, bias: torch.Tensor, seed: int, eos: int, max_steps: int = 400,
                 width: int | None = None) -> list[int]:
    """A sampling loop over random logits (the processor-level stand-in for a model); returns the tokens
    before EOS. Fails if a masked token would be sampled or EOS never comes."""
    generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    for _ in range(max_steps):
        logits = torch.randn(width or bias.shape[0], generator=generator) * 2
        logits[: bias.shape[0]] += bias[: logits.shape[0]]
        logits = processor(tokens, logits)
        token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        assert logits[token] > float("-inf")
        processor.accept(token)
        if token == eos:
            return tokens
        tokens.append(token)
    raise AssertionError(f"no EOS within {max_steps} steps")


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_output_validates(compiler, tokenizer, closing_bias, name):
    grammar = compiler.compile_openai(json_schema_format(SCHEMAS[name]))
    for seed in range(3):
        tokens = sample_under(grammar.processor(), closing_bias, seed, tokenizer.eos_token_id)
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_object_mode_yields_an_object(compiler, tokenizer, closing_bias):
    grammar = compiler.compile_openai({"type": "json_object"})
    for seed in range(3):
        tokens = sample_under(grammar.processor(), closing_bias, seed, tokenizer.eos_token_id)
        assert isinstance(json.loads(tokenizer.decode(tokens, skip_special_tokens=False)), dict)


def test_mask_matches_the_matcher_token_by_token(compiler, tokenizer, closing_bias):
    """Along a sampled walk, each step's mask is compared with an independent matcher that is asked,
    token by token, whether it would accept: 40 allowed and 40 masked tokens drawn at random per step."""
    grammar = compiler.compile_openai(json_schema_format(NESTED))
    walk = sample_under(grammar.processor(), closing_bias, 7, tokenizer.eos_token_id)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    processor, reference = grammar.processor(), xgr.GrammarMatcher(grammar.compiled)
    generator = torch.Generator().manual_seed(0)
    for step, token in enumerate(walk[:12]):
        logits = processor(walk[:step], torch.zeros(len(tokenizer)))
        allowed = torch.nonzero(logits == 0).flatten()
        blocked = torch.nonzero(logits == float("-inf")).flatten()
        sample = [*allowed[torch.randperm(len(allowed), generator=generator)[:40]].tolist(),
                  *blocked[torch.randperm(len(blocked), generator=generator)[:40]].tolist()]
        for candidate in sample:
            probe = reference.fork()
            expected = candidate not in special and probe.accept_token(candidate)
            assert (logits[candidate] == 0) == expected, (step, candidate, tokenizer.decode([candidate]))
        assert not set(allowed.tolist()) & special  # <|im_start|> & co. never get into a JSON string
        processor.accept(token)
        assert reference.accept_token(token)


def test_cpu_apply_matches_the_reference(compiler, tokenizer):
    processor = compiler.compile_openai(json_schema_format(ENUM)).processor()
    for token in tokenizer.encode('{"sentiment": "neu', add_special_tokens=False):
        bitmask = processor.allowed_bitmask().clone()
        fast = processor([], torch.randn(PADDED_WIDTH))
        slow = torch.randn(PADDED_WIDTH)
        apply_bitmask_reference(slow, bitmask, len(tokenizer))
        slow[len(tokenizer):] = float("-inf")
        assert torch.equal(torch.isinf(fast), torch.isinf(slow))
        processor.accept(token)


def test_only_eos_once_the_grammar_is_complete(compiler, tokenizer):
    eos = tokenizer.eos_token_id
    instance = {"sentiment": "positive", "score": 0.5}
    tokens = tokenizer.encode(json.dumps(instance, separators=JSON_SEPARATORS), add_special_tokens=False)
    processor = compiler.compile_openai(json_schema_format(ENUM)).processor()
    for step, token in enumerate(tokens):
        logits = processor(tokens[:step], torch.zeros(len(tokenizer)))
        assert logits[eos] == float("-inf"), f"EOS allowed before the object closed (step {step})"
        assert logits[token] == 0
        processor.accept(token)
    for _ in range(2):  # complete, then after EOS itself (a request that ignores EOS keeps stepping)
        logits = processor(tokens, torch.zeros(len(tokenizer)))
        assert torch.nonzero(logits == 0).flatten().tolist() == [eos]
        processor.accept(eos)
    assert processor.terminated


def test_a_token_outside_the_grammar_ends_the_sequence(compiler, tokenizer):
    """Only a later stage (an EOS ban under min_tokens) can pick a masked token: the processor logs it and
    allows only EOS from then on, rather than raising inside the scheduler's step."""
    processor = compiler.compile_openai(json_schema_format(ENUM)).processor()
    processor.accept(tokenizer.encode("hello", add_special_tokens=False)[0])
    assert processor.failed
    logits = processor([], torch.zeros(len(tokenizer)))
    assert torch.nonzero(logits == 0).flatten().tolist() == [tokenizer.eos_token_id]


def test_padded_and_narrow_logits(tokenizer, closing_bias):
    """The model's head may be wider than the tokenizer (ids past it are never allowed) and a row may be
    narrower than the compiled vocabulary."""
    padded = GrammarCompiler(tokenizer, PADDED_WIDTH, [tokenizer.eos_token_id])
    grammar = padded.compile_openai(json_schema_format(ENUM))
    logits = grammar.processor()([], torch.zeros(PADDED_WIDTH))
    assert torch.all(logits[len(tokenizer):] == float("-inf"))
    tokens = sample_under(grammar.processor(), closing_bias, 3, tokenizer.eos_token_id, width=PADDED_WIDTH)
    jsonschema.validate(json.loads(tokenizer.decode(tokens)), ENUM)
    narrow = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id]).compile_openai(json_schema_format(ENUM))
    wide = narrow.processor()([], torch.zeros(PADDED_WIDTH))  # a row wider than compiled for
    assert torch.all(wide[len(tokenizer):] == float("-inf")) and (wide == 0).any()


@pytest.mark.parametrize("response_format, message", [
    ({"type": "xml"}, "response_format.type"),
    ("json", "response_format must be an object"),
    ({"type": "json_schema"}, "response_format.json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"schema": True}}, "schema must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "strict must be true or false"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "name": "n" * 65}}, "name must be a string"),
    (json_schema_format({"type": "strng"}), "cannot be compiled: Unsupported type"),
    (json_schema_format({"$ref": "#/$defs/missing"}), "cannot be compiled"),
    (json_schema_format({"type": "string", "pattern": "(("}), "cannot be compiled"),
    (json_schema_format({"type": "string", "maxLength": 10**6}), f"maxLength=1000000 is over {MAX_REPEAT_BOUND}"),
    (json_schema_format({"type": "string", "pattern": "^a{1,100000}$"}), "a repetition in pattern"),
    (json_schema_format({"type": "object", "properties": {f"p{n}": {"type": "string", "maxLength": 10 + n}
                                                          for n in range(MAX_STRING_LENGTH_BOUNDS + 1)}}),
     "distinct minLength/maxLength values"),
    (json_schema_format({"enum": ["x" * 1000] * 70}), f"over {MAX_SCHEMA_BYTES // 1024} KiB"),
    (json_schema_format({"type": "object", "x": nested_lists(70)}), "nests deeper than"),
])
def test_bad_response_formats_are_value_errors(compiler, response_format, message):
    with pytest.raises(ValueError, match="response_format") as caught:
        compiler.compile_openai(response_format)
    assert message in str(caught.value)


def test_text_format_needs_no_grammar(compiler):
    assert compiler.compile_openai({"type": "text"}) is None


def test_cache_is_keyed_by_schema_and_bounded(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id], cache_size=2)
    first = compiler.compile_openai(json_schema_format(ENUM))
    assert compiler.compile_openai(json_schema_format(json.loads(json.dumps(ENUM)))) is first  # equal schema, a hit
    swapped = {**ENUM, "properties": dict(reversed(ENUM["properties"].items()))}
    assert compiler.compile_openai(json_schema_format(swapped)) is not first  # key order is generation order
    compiler.compile_openai({"type": "json_object"})
    assert compiler.compile_openai(json_schema_format(ENUM)) is not first  # evicted: the cache holds 2
    assert ResponseFormat.from_openai(json_schema_format(ENUM)).schema_json == json.dumps(ENUM, separators=(",", ":"))


def test_compile_from_threads(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    results, errors = [], []

    def compile_one(i: int) -> None:
        try:
            results.append(compiler.compile_openai(json_schema_format({**ENUM, "title": f"t{i % 2}"})))
        except Exception as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=compile_one, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 6
    assert len({id(grammar) for grammar in results}) == 2  # each schema compiled once, the waiters share it


# -- the real base ------------------------------------------------------------------------------------

EXAMPLE_ADAPTER = Path(__file__).resolve().parents[2] / "examples" / "adapters" / "chatbot-tech"
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                   "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "age", "languages"],
}
TICKET = {
    "type": "object",
    "properties": {"category": {"enum": ["account", "billing", "bug", "other"]}, "urgent": {"type": "boolean"}},
    "required": ["category", "urgent"],
}
REAL_CASES = [  # (adapter?, schema or None for json_object, prompt)
    (False, PERSON, "Describe a software engineer as JSON with name, age and languages."),
    (True, TICKET, "Classify this support request as JSON: I cannot log in to my account."),
    (True, None, "Give a JSON object with the keys city and country for Paris."),
]


@pytest.fixture(scope="module")
def smollm2(smollm2_base):
    from server.engine.base_model import load_base
    from tests.server.conftest import CPU_FP32

    return load_base(smollm2_base, CPU_FP32)


@pytest.fixture(scope="module")
def smollm2_grammars(smollm2) -> GrammarCompiler:
    return GrammarCompiler.for_base(smollm2)


@pytest.mark.integration
@pytest.mark.parametrize("with_adapter, schema, question", REAL_CASES,
                         ids=["base-person", "adapter-ticket", "adapter-json-object"])
def test_real_smollm2_generates_valid_json(smollm2, smollm2_grammars, with_adapter, schema, question):
    """Greedy decoding with SmolLM2-135M, alone and with a shipped LoRA adapter, through DecodeState (the
    processor appended to its per-row processors, as the route will): the text parses and validates."""
    from transformers import DynamicCache

    from adapters import read_adapter_folder
    from server.engine.decode_state import DecodeState
    from server.engine.generate import eos_ids
    from server.engine.loaded import load_adapter
    from server.engine.sampling import SamplingParams
    from tests.server.conftest import CPU_FP32

    adapter = None
    if with_adapter:
        adapter = load_adapter("tech", 1, read_adapter_folder(EXAMPLE_ADAPTER), CPU_FP32.device, CPU_FP32.dtype)
    fmt = json_schema_format(schema) if schema is not None else {"type": "json_object"}
    grammar = smollm2_grammars.compile_openai(fmt)
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                   add_generation_prompt=True, tokenize=True)
    state = DecodeState(SamplingParams(max_tokens=64), smollm2.tokenizer, eos_ids(smollm2), CPU_FP32.device)
    state.processors.append(grammar.processor())
    cache, step_input, text = DynamicCache(), torch.tensor([prompt]), ""
    with torch.inference_mode(), smollm2.adapters_for_rows([adapter]):
        while not state.finished:
            out = smollm2.model(input_ids=step_input, past_key_values=cache, use_cache=True, logits_to_keep=1)
            delta = state.step(out.logits[0, -1])
            text += delta.text
            step_input = torch.tensor([[delta.token_id]])
    assert delta.finish_reason == "stop" and delta.eos, text  # ended by the grammar, not by max_tokens
    jsonschema.validate(json.loads(text), schema if schema is not None else {"type": "object"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_are_masked_like_cpu_logits(compiler, tokenizer):
    cpu, cuda = (compiler.compile_openai(json_schema_format(NESTED)).processor() for _ in range(2))
    for step, token in enumerate(tokenizer.encode('{"name": "Ada", "age": 3', add_special_tokens=False)):
        logits = torch.randn(PADDED_WIDTH)
        expected = cpu([], logits.clone())
        assert torch.equal(cuda([], logits.cuda()).cpu(), expected), step
        cpu.accept(token)
        cuda.accept(token)
