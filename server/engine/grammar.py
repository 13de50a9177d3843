"""Structured output: OpenAI's `response_format` compiled once into a grammar over the base's vocabulary,
and a per-row `GrammarProcessor` that keeps one sequence's tokens inside it.

    compiler = GrammarCompiler.for_base(base)            # once per base, in the lifespan (~0.5 s)
    grammar = compiler.compile_openai(response_format)   # OpenAI's dict; None for "text"; ValueError -> 400;
                                                         # cached; call it from a worker thread
    processor = grammar.processor()          # one per sequence (each of n choices gets its own)
    logits = processor(generated, logits)    # disallowed tokens -> -inf
    processor.accept(token)                  # advance the matcher

The library is xgrammar (benchmarks/bench_grammar.py has the measurement and the reasons). Its masks are
mostly precomputed per grammar state, so a step costs a lookup plus the bitmask apply. What this module
adds around it:
- the tokenizer's special tokens (`<|im_start|>`, `<file_sep>`, ...) are never allowed: xgrammar would read
  them as their literal text and let them into a JSON string;
- ids past the tokenizer's vocabulary (the model's logits are often padded) are never allowed, and a row of
  logits wider or narrower than the compiled vocabulary is handled;
- once the grammar is complete, only the EOS token(s) are allowed, so generation ends cleanly;
- schemas are bounded in size, depth and repetition counts before compiling: xgrammar expands bounded
  strings into its grammar (about 2 s per distinct minLength/maxLength on the 2-core box, 6 s for
  `maxLength: 10**6`), so a hostile schema could otherwise hold compile threads for minutes; one schema
  arriving in many requests at once is compiled once, and at most COMPILE_CONCURRENCY compile at a time;
- compiled grammars are cached in a bounded LRU keyed by the schema's compact JSON (key order kept: it is
  the order the properties are generated in).
Whitespace is fixed to `json.dumps`'s separators (", " and ": ") with no other whitespace: a small model
given free whitespace can loop on newlines until max_tokens.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import xgrammar as xgr

log = logging.getLogger(__name__)

MAX_SCHEMA_BYTES = 64 * 1024  # compact JSON text of one schema
MAX_SCHEMA_DEPTH = 64  # nested JSON containers inside the schema document
MAX_SCHEMA_NODES = 10_000  # JSON values inside the schema document
MAX_REPEAT_BOUND = 4096  # minLength/maxLength/minItems/... and {m,n} in patterns; compile time grows with it
MAX_STRING_LENGTH_BOUNDS = 8  # distinct minLength/maxLength values: xgrammar spends up to ~2 s on each
STRING_LENGTH_KEYWORDS = ("minLength", "maxLength")
LENGTH_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
                   "minContains", "maxContains")
PATTERN_BOUNDS = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")  # {m}, {m,}, {m,n} quantifiers
JSON_SEPARATORS = (", ", ": ")
DEFAULT_CACHE_SIZE = 128  # compiled grammars kept; each holds its precomputed masks (0.1-4 MB seen)
COMPILE_THREADS = 2  # xgrammar builds the per-state masks in parallel (it drops the GIL meanwhile)
COMPILE_CONCURRENCY = 2  # schemas compiled at once; more wait, so compiles cannot starve the scheduler
SUPPORTED_TYPES = ("text", "json_object", "json_schema")


@dataclass(frozen=True)
class ResponseFormat:
    """A parsed `response_format` that constrains the output. `schema_json`: the schema's compact JSON
    text (json_schema only); `name`: OpenAI's label for it (not used to generate)."""

    type: str  # "json_object" or "json_schema"
    schema_json: str | None = None
    name: str | None = None

    @classmethod
    def from_openai(cls, value: Mapping[str, Any]) -> ResponseFormat | None:
        """OpenAI's shape -> a ResponseFormat, or None for {"type": "text"} (nothing to constrain).
        Raises ValueError, naming response_format, for anything else."""
        if not isinstance(value, Mapping):
            raise ValueError("response_format must be an object with a 'type'")
        kind = value.get("type")
        if kind not in SUPPORTED_TYPES:
            raise ValueError(f"response_format.type must be one of {', '.join(SUPPORTED_TYPES)}, not {kind!r}")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object")
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping):
            raise ValueError("response_format.json_schema must be an object with a 'schema'")
        name, schema, strict = spec.get("name"), spec.get("schema"), spec.get("strict")
        if name is not None and (not isinstance(name, str) or len(name) > 64):
            raise ValueError("response_format.json_schema.name must be a string of at most 64 characters")
        if strict is not None and not isinstance(strict, bool):
            raise ValueError("response_format.json_schema.strict must be true or false")
        if not isinstance(schema, Mapping):
            raise ValueError("response_format.json_schema.schema must be a JSON Schema object")
        check_schema_bounds(schema)
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        if len(text.encode()) > MAX_SCHEMA_BYTES:
            raise ValueError(f"response_format.json_schema.schema is over {MAX_SCHEMA_BYTES // 1024} KiB of JSON")
        return cls("json_schema", text, name)


def check_schema_bounds(schema: Mapping[str, Any]) -> None:
    """Refuse a schema whose size, depth or repetition counts would make compiling it slow or large
    (before it reaches the library). Walks the document iteratively: a deep one cannot overflow the stack."""
    stack: list[tuple[Any, int]] = [(schema, 1)]
    nodes = 0
    string_bounds: set[float] = set()
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise ValueError(f"response_format.json_schema.schema has over {MAX_SCHEMA_NODES} values")
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"response_format.json_schema.schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(value, Mapping):
            for key in LENGTH_KEYWORDS:
                bound = value.get(key)
                if not isinstance(bound, (int, float)) or isinstance(bound, bool):
                    continue
                if bound > MAX_REPEAT_BOUND:
                    raise ValueError(f"response_format.json_schema.schema: {key}={bound} is over {MAX_REPEAT_BOUND}")
                if key in STRING_LENGTH_KEYWORDS and bound > 1:
                    string_bounds.add(bound)
                    if len(string_bounds) > MAX_STRING_LENGTH_BOUNDS:
                        raise ValueError(f"response_format.json_schema.schema has over {MAX_STRING_LENGTH_BOUNDS} "
                                         "distinct minLength/maxLength values")
            pattern = value.get("pattern")
            if isinstance(pattern, str):
                for low, high in PATTERN_BOUNDS.findall(pattern):
                    if max(int(low), int(high or 0)) > MAX_REPEAT_BOUND:
                        raise ValueError(f"response_format.json_schema.schema: a repetition in pattern "
                                         f"{pattern[:80]!r} is over {MAX_REPEAT_BOUND}")
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


@dataclass(frozen=True)
class CompiledGrammar:
    """A response_format compiled for one base's vocabulary; shared by every request that asks for it."""

    compiled: xgr.CompiledGrammar
    vocab_size: int  # the model's logits width it was compiled for (ids past the tokenizer are never allowed)
    eos_ids: tuple[int, ...]
    eos_bitmask: torch.Tensor  # [1, ceil(vocab / 32)] int32: only the EOS ids allowed

    def processor(self) -> GrammarProcessor:
        """A fresh per-sequence processor (it is stateful: one per choice, never shared)."""
        return GrammarProcessor(self)


class GrammarCompiler:
    """Compiles ResponseFormats for one base; thread-safe, so the route can compile off the scheduler
    thread. Built once per base (the vocabulary is read once: about 0.3 s for 49k tokens)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        """`vocab_size`: the width of the model's logits (may exceed the tokenizer's vocabulary);
        `eos_ids`: the tokens that end a sequence (the only ones allowed once the grammar is complete)."""
        if not eos_ids:
            raise ValueError("structured output needs at least one EOS token id")
        self.vocab_size = vocab_size
        self.eos_ids = tuple(sorted(int(i) for i in eos_ids))
        self.cache_size = cache_size
        self.info = _tokenizer_info(tokenizer, vocab_size, self.eos_ids)
        # xgrammar's own cache is unbounded by default; ours is bounded, so turn its off
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=COMPILE_THREADS, cache_enabled=False)
        self._eos_bitmask = _eos_only_bitmask(vocab_size, self.eos_ids)
        self._cache: OrderedDict[tuple[str, str | None], CompiledGrammar] = OrderedDict()
        self._pending: dict[tuple[str, str | None], Future] = {}  # being compiled now, by one thread
        self._lock = threading.Lock()  # guards _cache and _pending (never held while compiling)
        self._compiling = threading.BoundedSemaphore(COMPILE_CONCURRENCY)

    @classmethod
    def for_base(cls, base, cache_size: int = DEFAULT_CACHE_SIZE) -> GrammarCompiler:
        """From a loaded BaseModel: its tokenizer, its logits' width (HF sizes the LM head by the config's
        vocab_size) and its EOS ids."""
        from server.engine.generate import eos_ids

        return cls(base.tokenizer, int(base.model.config.vocab_size), sorted(eos_ids(base)), cache_size)

    def compile_openai(self, value: Mapping[str, Any]) -> CompiledGrammar | None:
        """OpenAI's response_format -> its compiled grammar, or None for {"type": "text"}. What the route
        calls (from a worker thread: a new schema can take a while); ValueError means a 400."""
        fmt = ResponseFormat.from_openai(value)
        return None if fmt is None else self.compile(fmt)

    def compile(self, fmt: ResponseFormat) -> CompiledGrammar:
        """The compiled grammar of `fmt`, from the cache or compiled now. Concurrent calls for one new
        schema compile it once (the others wait for it); at most COMPILE_CONCURRENCY compile at a time."""
        key = (fmt.type, fmt.schema_json)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = Future()
        if not owner:
            return pending.result()
        try:
            with self._compiling:
                grammar = CompiledGrammar(self._compile_uncached(fmt), self.vocab_size, self.eos_ids,
                                          self._eos_bitmask)
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        pending.set_result(grammar)
        return grammar

    def _compile_uncached(self, fmt: ResponseFormat) -> xgr.CompiledGrammar:
        if fmt.type == "json_object":
            schema, strict = '{"type": "object"}', False  # any object: additional properties allowed
        elif fmt.type == "json_schema" and fmt.schema_json is not None:
            schema, strict = fmt.schema_json, True  # no properties beyond the schema's are generated
        else:
            raise ValueError(f"response_format.type {fmt.type!r} has no grammar")
        try:
            return self._compiler.compile_json_schema(schema, any_whitespace=False, separators=JSON_SEPARATORS,
                                                      strict_mode=strict)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar reports a bad schema as RuntimeError
            raise ValueError(f"response_format.json_schema.schema cannot be compiled: {_library_message(exc)}") from exc


class GrammarProcessor:
    """One sequence's grammar state, as a LogitsProcessor (logits_processors.py): `__call__` sets every
    token the grammar does not allow next to -inf, `accept` advances the matcher by the sampled token.
    Once the grammar is complete only EOS is allowed (also after EOS, should the request ignore it)."""

    def __init__(self, grammar: CompiledGrammar) -> None:
        self.grammar = grammar
        self.matcher = xgr.GrammarMatcher(grammar.compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, grammar.vocab_size)  # [1, ceil(vocab / 32)] int32, CPU
        self._device_bitmask: torch.Tensor | None = None  # a copy beside non-CPU logits
        self._failed = False

    @property
    def terminated(self) -> bool:
        """EOS was accepted: the grammar is complete and the sequence ended."""
        return self.matcher.is_terminated()

    def allowed_bitmask(self) -> torch.Tensor:
        """[1, ceil(vocab / 32)] int32 on the CPU, bit j of word i set = token 32 * i + j allowed next."""
        if self._failed or self.matcher.is_terminated():
            self.bitmask.copy_(self.grammar.eos_bitmask)
        else:
            self.matcher.fill_next_token_bitmask(self.bitmask)
        return self.bitmask

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        # logits: [width] float32 of this row; width may differ from the compiled vocab (padded heads)
        bitmask = self.allowed_bitmask()
        vocab = min(logits.shape[-1], self.grammar.vocab_size)
        if logits.device.type == "cpu":
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, backend="cpu")
        else:
            # plain torch ops on the device: xgrammar's default there is a Triton kernel, compiled on first use
            if self._device_bitmask is None or self._device_bitmask.device != logits.device:
                self._device_bitmask = torch.empty_like(bitmask, device=logits.device)
            self._device_bitmask.copy_(bitmask, non_blocking=True)
            apply_bitmask_reference(logits, self._device_bitmask, vocab)
        if logits.shape[-1] > vocab:
            logits[vocab:] = float("-inf")
        return logits

    def accept(self, token: int) -> None:
        if self._failed or self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(int(token)):
            # only a stage after the mask can pick a disallowed token (an EOS ban under min_tokens leaves
            # no token at all). Log it and allow only EOS from here: the sequence ends instead of failing.
            log.error("token %d is outside the response_format grammar; ending the sequence", token)
            self._failed = True

    @property
    def failed(self) -> bool:
        """A disallowed token was accepted: the output may not match the schema."""
        return self._failed


def apply_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, vocab: int) -> None:
    """The obviously-correct apply: logits[t] = -inf for every t < vocab whose bit is clear.
    logits: [width] float; bitmask: [1, ceil(vocab / 32)] int32 on the logits' device."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[0].unsqueeze(-1) >> shifts) & 1).view(-1)[:vocab].bool()  # [vocab]
    logits[:vocab].masked_fill_(~allowed, float("-inf"))


def _tokenizer_info(tokenizer, vocab_size: int, eos_ids: tuple[int, ...]) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary, with every special token blanked: xgrammar treats an empty
    token as special (never allowed, stop tokens aside) but would read `<|im_start|>` as literal text."""
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(eos_ids))
    added = getattr(tokenizer, "added_tokens_decoder", {})  # {id: AddedToken}; plain added words stay
    special = set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", True)}
    encoded = [""] * vocab_size
    for token, token_id in tokenizer.get_vocab().items():
        if token_id < vocab_size and token_id not in special:
            encoded[token_id] = token
    return xgr.TokenizerInfo(encoded, detected.vocab_type, vocab_size=vocab_size, stop_token_ids=list(eos_ids),
                             add_prefix_space=detected.add_prefix_space)


def _eos_only_bitmask(vocab_size: int, eos_ids: tuple[int, ...]) -> torch.Tensor:
    allowed = torch.zeros(((vocab_size + 31) // 32) * 32, dtype=torch.bool)
    allowed[[i for i in eos_ids if i < vocab_size]] = True
    weights = torch.tensor([1 << j for j in range(31)] + [-(1 << 31)], dtype=torch.int64)  # bit 31: the sign
    return (allowed.view(-1, 32).long() * weights).sum(dim=1).to(torch.int32).unsqueeze(0)


def _library_message(exc: Exception) -> str:
    """xgrammar's message without its '[time] /project/cpp/file.cc:line: ' prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", text)[:300]
