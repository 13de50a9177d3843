"""POST /v1/completions and /v1/chat/completions (OpenAI shapes; SSE when `stream: true`)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.api.errors import ApiError
from server.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.api.state import AppState, State
from server.engine.generate import TextDelta, generate_tokens
from server.engine.loaded import LoadedAdapter
from server.engine.sampling import SamplingParams

router = APIRouter(tags=["generation"])
_DONE = object()


@dataclass(frozen=True)
class GenerationJob:
    """One validated request: everything the decode loop and the response writer need."""

    request_id: str
    model: str
    adapter: LoadedAdapter | None
    prompt_ids: list[int]
    params: SamplingParams
    chat: bool
    started: float


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "exactly one prompt per request is served; send one request per prompt")
    if not prompts[0]:
        raise ApiError(400, "prompt must not be empty")
    adapter = _resolve_generation_model(state, body.model, request)
    prompt_ids = state.base.tokenizer(prompts[0], add_special_tokens=True)["input_ids"]
    job = _make_job(state, body, body.max_tokens, adapter, prompt_ids, chat=False)
    return await _respond(state, job, body, request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State):
    adapter = _resolve_generation_model(state, body.model, request)
    tokenizer = state.base.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"base {state.served_name!r} has no chat template; use /v1/completions")
    if all(not m.content for m in body.messages):
        raise ApiError(400, "messages must not all be empty")
    messages = [m.model_dump() for m in body.messages]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    max_tokens = body.max_completion_tokens or body.max_tokens
    job = _make_job(state, body, max_tokens, adapter, list(prompt_ids), chat=True)
    return await _respond(state, job, body, request)


def _resolve_generation_model(state: AppState, model: str, request: Request) -> LoadedAdapter | None:
    if not state.base.can_generate:
        raise ApiError(400, f"base {state.served_name!r} is an encoder; it serves /v1/classify only")
    adapter = state.resolve_model(model)
    request.state.adapter_label = state.metrics.adapter_label(adapter.name if adapter else None)
    if adapter is not None and adapter.task != "completion":
        raise ApiError(400, f"adapter {model!r} is a {adapter.task} adapter; use /v1/classify")
    return adapter


def _make_job(
    state: AppState, body: SamplingFields, max_tokens: int | None, adapter: LoadedAdapter | None,
    prompt_ids: list[int], chat: bool,
) -> GenerationJob:
    limit = state.config.max_tokens_limit
    max_tokens = max_tokens or min(state.config.default_max_tokens, state.max_model_len - len(prompt_ids))
    if max_tokens > limit:
        raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit of {limit}")
    if len(prompt_ids) + max_tokens > state.max_model_len:
        raise ApiError(
            400,
            f"this model's context is {state.max_model_len} tokens; the prompt has {len(prompt_ids)} and "
            f"max_tokens asks for {max_tokens}. Shorten the prompt or lower max_tokens.",
        )
    if body.min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens={body.min_tokens} is above max_tokens={max_tokens}")
    stops = body.stop_strings()
    if len(stops) > 8:
        raise ApiError(400, "at most 8 stop strings are allowed")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
        seed=body.seed, stop=stops, ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
    )
    prefix = "chatcmpl" if chat else "cmpl"
    return GenerationJob(f"{prefix}-{uuid.uuid4().hex}", body.model, adapter, prompt_ids, params, chat, time.perf_counter())


def _is_eos(delta: TextDelta) -> bool:
    """The step that sampled an end-of-sequence token: it ends the request but is not completion text."""
    return delta.eos


def _run_locked(state: AppState, job: GenerationJob) -> Iterator[TextDelta]:
    """The decode loop, holding the engine for its whole duration (released when the iterator closes)."""
    with state.engine_lock:
        label = state.metrics.adapter_label(job.adapter.name if job.adapter else None)
        state.metrics.prompt_tokens.labels(label).inc(len(job.prompt_ids))
        first = True
        for delta in generate_tokens(state.base, job.prompt_ids, job.params, job.adapter):
            if first:
                state.metrics.time_to_first_token.labels(label).observe(time.perf_counter() - job.started)
                first = False
            if not _is_eos(delta):
                state.metrics.generation_tokens.labels(label).inc()
            yield delta


async def _respond(state: AppState, job: GenerationJob, body: SamplingFields, request: Request):
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # The middleware would time only the response headers; the stream records its own end-to-end latency.
        request.state.latency_recorded_by_route = True
        latency = state.metrics.request_latency.labels(request.scope["route"].path, request.state.adapter_label)
        return StreamingResponse(_sse(state, job, include_usage, latency), media_type="text/event-stream")
    deltas = await run_in_threadpool(lambda: list(_run_locked(state, job)))
    text = "".join(d.text for d in deltas)
    completion_tokens = sum(1 for d in deltas if not _is_eos(d))
    finish = deltas[-1].finish_reason if deltas else "length"
    usage = {
        "prompt_tokens": len(job.prompt_ids), "completion_tokens": completion_tokens,
        "total_tokens": len(job.prompt_ids) + completion_tokens,
    }
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        if job.chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    )
    return {
        "id": job.request_id, "object": "chat.completion" if job.chat else "text_completion",
        "created": int(time.time()), "model": job.model, "choices": [choice], "usage": usage,
    }


async def _sse(state: AppState, job: GenerationJob, include_usage: bool, latency) -> AsyncIterator[str]:
    created = int(time.time())
    kind = "chat.completion.chunk" if job.chat else "text_completion"
    gen = _run_locked(state, job)
    completion_tokens = 0

    def chunk(choice: dict, usage: dict | None = None) -> str:
        payload = {"id": job.request_id, "object": kind, "created": created, "model": job.model,
                   "choices": [choice] if choice else []}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if job.chat:
            yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        while True:
            delta = await run_in_threadpool(next, gen, _DONE)
            if delta is _DONE:
                break
            if not _is_eos(delta):
                completion_tokens += 1
            if not delta.text and delta.finish_reason is None:
                continue
            if job.chat:
                yield chunk({"index": 0, "delta": {"content": delta.text} if delta.text else {},
                             "finish_reason": delta.finish_reason})
            else:
                yield chunk({"index": 0, "text": delta.text, "finish_reason": delta.finish_reason, "logprobs": None})
        if include_usage:
            usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion_tokens,
                     "total_tokens": len(job.prompt_ids) + completion_tokens}
            yield chunk({}, usage)
        yield "data: [DONE]\n\n"
    finally:
        gen.close()
        latency.observe(time.perf_counter() - job.started)
