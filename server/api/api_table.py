"""The API table in docs/api.md: every field OpenAI's API (and vLLM's sampling extras) offers per endpoint,
and what this server does with it, derived from the request schemas so that the table cannot drift.

A field's status comes from its request model's JSON schema (what `/openapi.json` shows), never from a
list written here:

- declared, not marked -> **supported**, with its type, bounds and default as the schema states them;
- declared with `NOT_IMPLEMENTED_MARK` (`_not_implemented(...)` in schemas.py) -> **refused with 400
  unless** one of the values the schema's `enum` accepts (each a no-op);
- not declared -> **refused with 400 (unknown field)** (every request body forbids extra fields).

What is written here is only what the schemas cannot know: which fields OpenAI and vLLM offer, and a
line on what each means. `tests/test_docs.py` regenerates the table and compares it with docs/api.md;
`python -m server.api.api_table --write docs/api.md` rewrites it there.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from server.api import schemas

START_MARK = "<!-- api-table:start -->"
END_MARK = "<!-- api-table:end -->"

OPENAI, VLLM, OURS = "OpenAI", "vLLM", "loraplex"

# What OpenAI offers per endpoint (field -> one line on what it asks for), in the order of OpenAI's reference.
OPENAI_COMPLETIONS = {
    "model": "the model to use (here: an adapter's name, or the base's for none)",
    "prompt": "the text to complete",
    "suffix": "text that comes after the completion (insertion)",
    "max_tokens": "most tokens to generate",
    "temperature": "sampling temperature; 0 is greedy",
    "top_p": "nucleus sampling: sample among the most likely tokens whose probabilities sum to top_p",
    "n": "completions to generate for the prompt",
    "stream": "send the output as server-sent events as it is generated",
    "stream_options": "stream settings: `include_usage` adds a last chunk with the token counts",
    "logprobs": "return the log-probabilities of the most likely tokens at each position",
    "echo": "return the prompt in front of the completion",
    "stop": "strings that end the generation when produced",
    "presence_penalty": "penalize tokens that have appeared at all",
    "frequency_penalty": "penalize tokens by how often they have appeared",
    "best_of": "generate several completions server-side and return the best",
    "logit_bias": "add a bias to the logits of given token ids",
    "user": "an end-user label for abuse monitoring",
    "seed": "seed the sampling, for repeatable output",
}
OPENAI_CHAT = {
    "messages": "the conversation so far",
    "model": OPENAI_COMPLETIONS["model"],
    "max_tokens": "most tokens to generate (the older name of max_completion_tokens)",
    "max_completion_tokens": "most tokens to generate",
    "temperature": OPENAI_COMPLETIONS["temperature"],
    "top_p": OPENAI_COMPLETIONS["top_p"],
    "n": "choices to generate for the conversation",
    "stream": OPENAI_COMPLETIONS["stream"],
    "stream_options": OPENAI_COMPLETIONS["stream_options"],
    "stop": OPENAI_COMPLETIONS["stop"],
    "presence_penalty": OPENAI_COMPLETIONS["presence_penalty"],
    "frequency_penalty": OPENAI_COMPLETIONS["frequency_penalty"],
    "logit_bias": OPENAI_COMPLETIONS["logit_bias"],
    "logprobs": "return the log-probability of each output token",
    "top_logprobs": "with logprobs: also the most likely alternatives at each position",
    "response_format": "constrain the output: plain text, any JSON object, or a given JSON schema",
    "seed": OPENAI_COMPLETIONS["seed"],
    "tools": "functions the model may call",
    "tool_choice": "whether the model must call a tool, and which",
    "parallel_tool_calls": "allow several tool calls in one answer",
    "user": OPENAI_COMPLETIONS["user"],
    "functions": "the deprecated form of tools",
    "function_call": "the deprecated form of tool_choice",
    "modalities": "output types to generate (text, audio)",
    "audio": "voice and format of audio output",
    "store": "keep the completion on OpenAI's side for distillation and evals",
    "metadata": "key-value tags for stored completions",
    "reasoning_effort": "how much a reasoning model reasons (low, medium, high)",
    "service_tier": "OpenAI's processing tier (latency and price)",
    "prediction": "predicted output, to speed up a regeneration that changes little",
    "web_search_options": "settings of OpenAI's web search tool",
}
OPENAI_EMBEDDINGS = {
    "input": "the text (or texts, or token ids) to embed",
    "model": "the model to use",
    "encoding_format": "`float` or `base64`",
    "dimensions": "truncate each embedding to this many dimensions",
    "user": OPENAI_COMPLETIONS["user"],
}
# vLLM's sampling extras on /v1/completions and /v1/chat/completions.
VLLM_SAMPLING = {
    "top_k": "sample among the k most likely tokens only (-1: no cut)",
    "min_p": "drop tokens below min_p times the most likely token's probability",
    "repetition_penalty": "scale down the logits of tokens already in the prompt or output (> 1 discourages repeats)",
    "min_tokens": "generate at least this many tokens before an end token or stop string may end the output",
    "ignore_eos": "keep generating past the end-of-sequence token",
    "stop_token_ids": "token ids that end the generation",
    "include_stop_str_in_output": "keep the stop string that ended the output in it",
    "skip_special_tokens": "leave special tokens out of the output text",
    "spaces_between_special_tokens": "put spaces between special tokens in the output text",
    "guided_json": "constrain the output to a JSON schema",
    "guided_regex": "constrain the output to a regular expression",
    "guided_choice": "constrain the output to one of the given strings",
    "guided_grammar": "constrain the output to a context-free grammar",
    "use_beam_search": "beam search instead of sampling",
    "length_penalty": "beam search's penalty on length",
    "prompt_logprobs": "return the log-probabilities of the prompt tokens",
    "truncate_prompt_tokens": "keep only the last k prompt tokens",
}
OURS_CLASSIFY = {
    "model": "the classification adapter (or a base with its own head)",
    "input": "the text, or texts, to classify",
}


@dataclass(frozen=True)
class Endpoint:
    """One route with a JSON body: the request model's name(s) in schemas.py and the fields others offer there."""

    path: str
    models: tuple[str, ...]  # the first name schemas.py defines is the route's body; none: not served here
    known: tuple[tuple[str, dict[str, str]], ...]  # (who offers them, field -> meaning), in table order
    note: str = ""


ENDPOINTS = (
    Endpoint("/v1/completions", ("CompletionRequest",), ((OPENAI, OPENAI_COMPLETIONS), (VLLM, VLLM_SAMPLING))),
    Endpoint("/v1/chat/completions", ("ChatCompletionRequest",), ((OPENAI, OPENAI_CHAT), (VLLM, VLLM_SAMPLING))),
    Endpoint("/v1/embeddings", ("EmbeddingRequest", "EmbeddingsRequest", "EmbeddingCreateRequest"),
             ((OPENAI, OPENAI_EMBEDDINGS),)),
    Endpoint("/v1/classify", ("ClassifyRequest",), ((OURS, OURS_CLASSIFY),),
             note="Neither OpenAI nor vLLM has this route: it serves classification adapters."),
)

SUPPORTED = "supported"
REFUSED_UNLESS = "refused with 400 unless"
REFUSED_UNKNOWN = "refused with 400 (unknown field)"
NOT_SERVED = "not served: no such route (404)"


def request_model(endpoint: Endpoint) -> type[BaseModel] | None:
    """The route's request body class, looked up by name (a class another change has not added yet: None)."""
    for name in endpoint.models:
        found = getattr(schemas, name, None)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return None


def _code(value: Any) -> str:
    return f"`{json.dumps(value)}`"


def _number(value: float) -> str:
    """A bound as written in the schema, powers of two (the seed's range) spelled as such."""
    if isinstance(value, int) and abs(value) > 2**32:
        for power in range(32, 129):
            for shown, exact in ((f"2^{power}", 2**power), (f"2^{power}-1", 2**power - 1),
                                 (f"-2^{power}", -(2**power))):
                if value == exact:
                    return shown
    return json.dumps(value)


def _interval(prop: dict[str, Any]) -> str:
    low = prop.get("minimum", prop.get("exclusiveMinimum"))
    high = prop.get("maximum", prop.get("exclusiveMaximum"))
    if low is not None and low == high:
        return f" = {_number(low)}"
    parts = []
    if low is not None:
        parts.append((">= " if "minimum" in prop else "> ") + _number(low))
    if high is not None:
        parts.append(("<= " if "maximum" in prop else "< ") + _number(high))
    return (" " + " and ".join(parts)) if parts else ""


def _length(prop: dict[str, Any], unit: str) -> str:
    keys = ("minLength", "maxLength") if unit == "chars" else ("minItems", "maxItems")
    low, high = prop.get(keys[0]), prop.get(keys[1])
    if low is None and high is None:
        return ""
    if low == high:
        return f" (exactly {low} {unit if low != 1 else unit.rstrip('s')})"
    if high is None:
        return f" ({low}+ {unit})"
    return f" ({low or 0}-{high} {unit})" if low else f" (at most {high} {unit})"


def describe_type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    """One JSON schema (a property or one branch of it) in a few words: type, bounds, lengths, values."""
    if "anyOf" in prop:
        branches = [describe_type(branch, defs) for branch in prop["anyOf"]]
        return ", ".join(branches[:-1]) + " or " + branches[-1] if len(branches) > 1 else branches[0]
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        fields = ", ".join(defs.get(name, {}).get("properties", {}))
        return f"object {{{fields}}}" if fields else "object"
    if "const" in prop:
        return _code(prop["const"])
    if "enum" in prop:
        return " or ".join(_code(v) for v in prop["enum"])
    kind = prop.get("type")
    if kind in ("integer", "number"):
        return kind + _interval(prop)
    if kind == "string":
        return "string" + _length(prop, "chars")
    if kind == "array":
        items = prop.get("items")
        return "array" + _length(prop, "items") + (f" of {describe_type(items, defs)}" if items else "")
    if kind == "object":
        values = prop.get("additionalProperties")
        return f"object of {describe_type(values, defs)}" if isinstance(values, dict) else "object"
    return kind or "any value"


def field_status(name: str, schema: dict[str, Any], with_description: bool = True) -> str:
    """What the server does with `name`, read from the request model's JSON schema (and the field's
    description, unless the table's meaning column already shows it)."""
    prop = schema.get("properties", {}).get(name)
    if prop is None:
        return REFUSED_UNKNOWN
    if prop.get(schemas.NOT_IMPLEMENTED_MARK):
        return f"{REFUSED_UNLESS} " + " or ".join(_code(v) for v in prop.get("enum", [None]))
    shown = {k: v for k, v in prop.items() if k not in ("title", "description", "default")}
    text = f"{SUPPORTED}: {describe_type(shown, schema.get('$defs', {}))}"
    if name in schema.get("required", ()):
        text += "; required"
    elif "default" in prop:
        text += f"; default {_code(prop['default'])}"
    if with_description and prop.get("description"):
        text += f"; {prop['description']}"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def endpoint_table(endpoint: Endpoint) -> str:
    """One endpoint's rows: every field others offer there, then the fields only this server declares."""
    model = request_model(endpoint)
    schema = model.model_json_schema() if model is not None else None
    rows: dict[str, tuple[str, str | None]] = {}  # field -> (who offers it, meaning); the first to offer it names it
    for who, fields in endpoint.known:
        for name, meaning in fields.items():
            rows.setdefault(name, (who, meaning))
    for name in (schema or {}).get("properties", {}):
        rows.setdefault(name, (OURS, None))  # ours alone: its schema description says what it means
    lines = [f"### `POST {endpoint.path}`", ""]
    if schema is None:
        lines += [f"Not served by this server yet (no `{endpoint.models[0]}` in `server/api/schemas.py`).", ""]
    else:
        lines += [" ".join(filter(None, (f"Request body: `{model.__name__}` in `server/api/schemas.py`.",
                                         endpoint.note))), ""]
    lines += ["| field | offered by | what it asks for | here |", "|---|---|---|---|"]
    for name, (who, meaning) in rows.items():
        if schema is None:
            status = NOT_SERVED
        else:
            status = field_status(name, schema, with_description=meaning is not None)
            meaning = meaning if meaning is not None else schema["properties"][name].get("description", "")
        lines.append(f"| `{name}` | {who} | {_cell(meaning)} | {_cell(status)} |")
    return "\n".join(lines)


def render() -> str:
    """The generated block, markers included, as docs/api.md must hold it."""
    body = "\n\n".join(endpoint_table(endpoint) for endpoint in ENDPOINTS)
    return (f"{START_MARK}\n<!-- generated by `python -m server.api.api_table --write docs/api.md`; "
            f"do not edit by hand -->\n\n{body}\n\n{END_MARK}")


def replace_block(text: str, block: str) -> str:
    """`text` with the part between the markers (markers included) replaced by `block`."""
    start, end = text.find(START_MARK), text.find(END_MARK)
    if start < 0 or end < start:
        raise ValueError(f"the markers {START_MARK} ... {END_MARK} are missing or out of order")
    return text[:start] + block + text[end + len(END_MARK):]


def current_block(text: str) -> str:
    """The part of `text` between the markers, markers included ('' without them)."""
    start, end = text.find(START_MARK), text.find(END_MARK)
    return text[start:end + len(END_MARK)] if 0 <= start < end else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.api.api_table", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", type=Path, metavar="FILE", help="replace the table between the markers in FILE")
    action.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE's table is not the generated one")
    args = parser.parse_args(argv)
    block = render()
    if args.write:
        args.write.write_text(replace_block(args.write.read_text(), block))
    elif args.check:
        if current_block(args.check.read_text()) != block:
            print(f"{args.check}: the API table is stale; run python -m server.api.api_table --write {args.check}",
                  file=sys.stderr)
            return 1
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
