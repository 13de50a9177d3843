"""Request and response bodies (pydantic at the HTTP edge; nothing past the routes sees a raw dict).

What happens to a request field we do not serve, decided once here:

- **Unknown fields are refused** (400 naming the field, `param` set), as OpenAI itself refuses an
  unrecognized argument. A typo such as `max_token` or a vLLM extra we do not implement (`min_p`, ...)
  silently ignored would change the output without a word. vLLM's extras that we implement (`top_k`,
  `min_tokens`, `ignore_eos`, `repetition_penalty`) are declared fields.
- **OpenAI fields we do not implement** (`_not_implemented(...)`: completions' `suffix`; chat's
  `tools`, `tool_choice`, `functions`, `function_call`, `parallel_tool_calls`,
  `modalities`, `audio`) are declared, so the OpenAPI schema lists them, and refused with a 400 naming them
  unless the value is OpenAI's default or means "off" (`suffix: ""`, `tools: []`, `tool_choice: "none"`):
  such a value asks for nothing we leave out, and clients that send every field with its default (the
  stock `openai` client sends only what it is given) work. Tool calling's refusal says so in those words.
  A chat content part other than text (`image_url`, `input_audio`) is refused too: text only.
- Served with bounds: `n`, completions' `best_of`, `echo` and `logprobs` (0..20), chat's `logprobs` and
  `top_logprobs` (0..20), `presence_penalty` / `frequency_penalty` (-2..2), `repetition_penalty` (> 0),
  `logit_bias` (token id -> -100..100), chat's `response_format` (text, json_object, json_schema; compiled
  and bounded by server/api/structured.py). The checks that need the server (n against --max-num-seqs, token
  ids against the vocabulary, best_of with stream) are the route's.
- `user` is accepted and unused: an end-user label for abuse monitoring that changes no output.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from server.engine.sampling import LOGIT_BIAS_RANGE, MAX_LOGPROBS, PENALTY_RANGE

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256  # per stop string: the stream's hold-back check costs len(stop)^2 per token
MAX_TEMPERATURE = 2.0
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts

NOT_SUPPORTED = "not supported by this server"
MAX_LOGIT_BIAS = 300  # token ids one request may bias
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")
TOOL_CALLING_REFUSED = "tool calling is " + NOT_SUPPORTED + ": omit {field} or send {accepted}"


class StrictBody(BaseModel):
    """A request body: unknown fields and non-finite numbers (Python's json reads NaN) are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(StrictBody):
    include_usage: bool = False


NOT_IMPLEMENTED_MARK = "x-not-implemented"


def _not_implemented(*accepted: Any) -> Any:
    """A declared OpenAI field we do not serve: null by default; the schema lists the values that ask for
    nothing (`enum`: null and OpenAI's default), `SamplingFields` refuses the rest naming the field."""
    shown = " or ".join(json.dumps(v) for v in (None, *accepted))
    return Field(None, description=f"{NOT_SUPPORTED}: only {shown} (a no-op) is accepted",
                 json_schema_extra={"enum": [None, *accepted], NOT_IMPLEMENTED_MARK: True})


def _same_value(value: Any, accepted: Any) -> bool:
    """JSON equality: 0 == 0.0, but false is not 0."""
    return value == accepted and isinstance(value, bool) == isinstance(accepted, bool)


class SamplingFields(StrictBody):
    """Fields shared by completions and chat (OpenAI's, plus vLLM's top_k, ignore_eos, min_tokens).

    A field declared with `_not_implemented(...)` accepts only the values that ask for nothing (see the
    module docstring); any other value is a 400 naming the field.
    """

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="vLLM's: -1 or 0 means no top-k cut")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = Field(
        None, description=f"at most {MAX_STOP_STRINGS}, each at most {MAX_STOP_CHARS} characters",
        json_schema_extra={"anyOf": [  # documented here, checked by `_bounded_stops` (its messages are clearer)
            {"type": "string", "maxLength": MAX_STOP_CHARS},
            {"type": "array", "items": {"type": "string", "maxLength": MAX_STOP_CHARS}, "maxItems": MAX_STOP_STRINGS},
            {"type": "null"}]})
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, description="choices to return, at most the server's --max-num-seqs; the prompt is "
                                        "prefilled once for all of them")
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    user: str | None = Field(None, description="accepted and unused (an end-user label; it changes no output)")
    presence_penalty: float | None = Field(
        None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1],
        description="OpenAI's: subtracted once from the logit of every token already generated")
    frequency_penalty: float | None = Field(
        None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1],
        description="OpenAI's: subtracted from a token's logit once per time it was generated")
    repetition_penalty: float | None = Field(
        None, gt=0.0, description="vLLM's: for tokens of the prompt or the output, a positive logit is divided by it "
                                  "and a negative one multiplied; 1 is off")
    logit_bias: dict[str, float] | None = Field(
        None, description=f"token id (a decimal string) -> bias added to its logit, in {LOGIT_BIAS_RANGE[0]:g}.."
                          f"{LOGIT_BIAS_RANGE[1]:g}; at most {MAX_LOGIT_BIAS} entries",
        json_schema_extra={"maxProperties": MAX_LOGIT_BIAS, "additionalProperties": {
            "type": "number", "minimum": LOGIT_BIAS_RANGE[0], "maximum": LOGIT_BIAS_RANGE[1]}})

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_not_implemented(cls, value: Any, info: ValidationInfo) -> Any:
        """Before the type check, so that any other value (`"0"` too) gets this message, not a type error."""
        extra = cls.model_fields[info.field_name].json_schema_extra
        if not isinstance(extra, dict) or not extra.get(NOT_IMPLEMENTED_MARK):
            return value
        accepted = extra["enum"]
        if any(_same_value(value, ok) for ok in accepted):
            return value
        message = TOOL_CALLING_REFUSED if info.field_name in TOOL_FIELDS else "{field} is " + NOT_SUPPORTED + \
            "; omit it or send {accepted}"
        raise PydanticCustomError(
            "not_supported", message,
            {"field": info.field_name, "accepted": " or ".join(json.dumps(ok) for ok in accepted)},
        )

    @field_validator("logit_bias")
    @classmethod
    def _bounded_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        """Keys are token ids; whether each exists in the vocabulary is the route's check."""
        if not bias:
            return bias
        if len(bias) > MAX_LOGIT_BIAS:
            raise PydanticCustomError("logit_bias", f"logit_bias may name at most {MAX_LOGIT_BIAS} token ids")
        low, high = LOGIT_BIAS_RANGE
        for key, value in bias.items():
            if not key.isascii() or not key.isdigit():
                raise PydanticCustomError("logit_bias", "logit_bias keys are token ids (decimal strings), not \"{key}\"",
                                          {"key": key})
            if not low <= value <= high:
                raise PydanticCustomError("logit_bias", "logit_bias values are in {low}..{high}, not {value} "
                                          "(token {key})", {"low": low, "high": high, "value": value, "key": key})
        return bias

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise PydanticCustomError("too_many_stops", f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise PydanticCustomError("stop_too_long", f"a stop string may hold at most {MAX_STOP_CHARS} characters")
        return stop

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):  # `stream` is declared (so validated) first
            raise PydanticCustomError("stream_options", "stream_options is only allowed when stream is true")
        return options

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(
        description="one non-empty prompt (a list holding one is accepted)",
        json_schema_extra={"anyOf": [  # documented here, checked by the route (its messages are clearer)
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1}]})
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description=f"return each token's logprob and the top `logprobs` (0..{MAX_LOGPROBS}) "
                                                 "alternatives: log-softmax of the model's raw logits")
    best_of: int | None = Field(None, ge=1, description="sample this many (at least n) and return the n with the "
                                                        "highest cumulative logprob; not with stream")
    echo: bool | None = Field(None, description="prepend the prompt to each choice's text (and, with logprobs, "
                                                "the prompt tokens' logprobs, the first null)")
    suffix: str | None = _not_implemented("")


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ChatMessage(StrictBody):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="`developer` is OpenAI's newer name for `system` and is served as one")
    content: str | list[TextPart] = Field(description="a string, or text parts (joined with newlines, as vLLM does)")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """A clear 400 for a content part we do not serve (image_url, input_audio, file), before the union's
        own errors (one per branch) bury it."""
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise PydanticCustomError(
                        "not_supported", "content parts of type \"{kind}\" are " + NOT_SUPPORTED +
                        ": it takes text only (no image or audio input)", {"kind": kind})
        return content

    def for_template(self) -> dict[str, str]:
        """The message as a chat template reads it: plain text, `developer` served as `system`."""
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="return each content token's logprob: log-softmax of the "
                                                    "model's raw logits")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description=f"the top alternatives (0..{MAX_LOGPROBS}) per token; needs logprobs")
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
                          '{"name": ..., "schema": {...}, "strict": ...}}: the reply is JSON (valid against the schema)')
    tools: list[dict[str, Any]] | None = _not_implemented([])
    tool_choice: str | dict[str, Any] | None = _not_implemented("none")
    functions: list[dict[str, Any]] | None = _not_implemented([])
    function_call: str | dict[str, Any] | None = _not_implemented("none")
    parallel_tool_calls: bool | None = _not_implemented(True)
    modalities: list[str] | None = _not_implemented(["text"])
    audio: dict[str, Any] | None = _not_implemented()

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):  # `logprobs` is declared (so validated) first
            raise PydanticCustomError("top_logprobs", "top_logprobs needs logprobs: true")
        return top

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_completion_limit(cls, limit: int | None, info: ValidationInfo) -> int | None:
        old = info.data.get("max_tokens")  # declared in SamplingFields, so validated first
        if limit is not None and old is not None and old != limit:
            raise PydanticCustomError(
                "max_tokens", "max_tokens and max_completion_tokens disagree; send one (max_tokens is its old name)")
        return limit

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ClassifyRequest(StrictBody):
    model: str = Field(min_length=1)
    input: str | list[str]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error body; every 4xx and 5xx this server sends has it."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` a route documents in the OpenAPI schema, one ErrorResponse per status."""
    return {status: {"model": ErrorResponse, "description": _STATUS_MEANING.get(status, "error")}
            for status in statuses}


_STATUS_MEANING = {
    400: "bad request (the message says what to change)", 401: "admin token missing or wrong",
    404: "unknown model or adapter", 409: "adapter not ready, or exists already", 429: "queue full; retry",
    500: "our failure (logged; nothing internal is shown)", 503: "starting or shutting down; retry",
    504: "past the request timeout", 507: "no room for another adapter",
}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token (the prompt's first with echo: null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's text as UTF-8


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ClassifyItem(BaseModel):
    index: int
    label: str
    probs: dict[str, float]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[ClassifyItem]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraplex"
    root: str
    parent: str | None = None
    task: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoraRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    lora_name: str


class AddAdapterRequest(BaseModel):
    name: str
    path: str
    replace: bool = False
    pin: bool = False


class AdapterInfo(BaseModel):
    name: str
    state: str
    task: str | None = None
    source: str
    rank: int | None = None
    version: int | None = None
    pinned: bool = False
    resident: bool = False  # in memory now; False: on disk only, re-read when a request names it



class EmbeddingRequest(StrictBody):
    """OpenAI's embeddings request. `input`: a text, a list of texts, one input as token ids, or a list of
    token-id inputs (taken as given: no special tokens are added to them)."""

    model: str = Field(min_length=1)
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="float: lists of numbers; base64: each vector as little-endian float32 bytes "
        "(the stock openai client asks for this and decodes it); null: float")
    dimensions: int | None = Field(None, ge=1, description="only the model's own size is served (no truncation)")
    user: str | None = Field(None, description="accepted and unused (an end-user label; it changes no output)")


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage
