"""Request and response bodies (pydantic at the HTTP edge; nothing past the routes sees a raw dict)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MAX_STOP_STRINGS = 8
MAX_TEMPERATURE = 2.0


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat (OpenAI's, plus vLLM's top_k, ignore_eos, min_tokens)."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is served")
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ClassifyRequest(BaseModel):
    model: str = Field(min_length=1)
    input: str | list[str]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


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
