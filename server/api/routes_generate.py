"""POST /v1/completions and /v1/chat/completions (OpenAI shapes; SSE when `stream: true`).

A request with n > 1 (or best_of) is one engine request sampling that many choices from one prefill;
its deltas carry the choice's index. Logprobs, penalties and logit_bias ride on SamplingParams; the
shapes the client sees are choices.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from server.api.choices import LogprobFormat, StreamedLogprobs, answer_choices, best_of, collect
from server.api.combination import MAX_PARTS, is_combination, parse_combination
from server.api.errors import ApiError, engine_error, wrong_task
from server.api.schemas import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, SamplingFields,
    error_responses,
)
from server.api.state import AppState, State
from server.engine.decode_state import TextDelta
from server.engine.loaded import Combination, LoadedAdapter
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, QueueFullError, Scheduler

if TYPE_CHECKING:
    from server.engine.grammar import CompiledGrammar

router = APIRouter(tags=["generation"], responses=error_responses(400, 404, 409, 429, 500, 503, 504))
STREAMED = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                  "description": "the completion; server-sent events ending `data: [DONE]` when `stream` is true"}}
RETRY_AFTER_S = "1"
DISCONNECT_POLL_S = 0.5
# Names the adapter version a request was admitted with (absent for the base), so a client can tell which
# side of a hot swap served it; loadtest/versions.py checks every answer against it. For a combination,
# each parent's: "a=3,b=1" (loaded.Combination.version).
VERSION_HEADER = "x-loraplex-adapter-version"


@dataclass(frozen=True)
class GenerationJob:
    """One validated request: everything the decode loop and the response writer need."""

    request_id: str
    model: str
    adapter: LoadedAdapter | None
    prompt_ids: list[int]
    params: SamplingParams  # params.n: the choices the engine samples (best_of of them, if asked)
    chat: bool
    started: float
    returned: int = 1  # choices in the answer (n; fewer than params.n with best_of)
    logprobs: int | None = None  # top alternatives the client asked for per token; None: no logprobs shown
    echo: str | None = None  # the prompt text, prepended to each choice's text (completions' echo)


@router.post("/v1/completions", response_model=CompletionResponse, responses=STREAMED)
async def completions(body: CompletionRequest, request: Request, response: Response, state: State):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "exactly one prompt per request is served; send one request per prompt", param="prompt")
    if not prompts[0]:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    adapter = await _acquire_generation_model(state, body.model, request)
    try:
        prompt_ids = state.base.tokenizer(prompts[0], add_special_tokens=True)["input_ids"]
        job = _make_job(state, body, body.max_tokens, adapter, prompt_ids, chat=False,
                        logprobs=body.logprobs, echo=prompts[0] if body.echo else None, best=body.best_of)
    except BaseException:
        state.release_model(adapter)
        raise
    return await _respond(state, job, body, request, response)  # the submission releases the adapter when done


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response, state: State):
    constraint = await _compile_response_format(state, body)  # before any adapter is held: it may take a while
    adapter = await _acquire_generation_model(state, body.model, request)
    try:
        tokenizer = state.base.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"base {state.served_name!r} has no chat template; use /v1/completions")
        messages = [m.for_template() for m in body.messages]
        if all(not m["content"] for m in messages):
            raise ApiError(400, "messages must not all be empty", param="messages")
        try:
            prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except TemplateError as exc:  # a template may refuse an order of roles ("roles must alternate", ...)
            raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages") from exc
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = _make_job(state, body, body.completion_limit(), adapter, list(prompt_ids), chat=True, logprobs=logprobs,
                        constraint=constraint)
    except BaseException:
        state.release_model(adapter)
        raise
    return await _respond(state, job, body, request, response)  # the submission releases the adapter when done


async def _compile_response_format(state: AppState, body: ChatCompletionRequest) -> CompiledGrammar | None:
    if body.response_format is None or body.response_format == {"type": "text"}:
        return None
    if state.structured is None:
        raise ApiError(400, "response_format is not served on this backend (onnxruntime)", param="response_format")
    for name in ("min_tokens", "ignore_eos"):
        if getattr(body, name):
            raise ApiError(400, f"{name} cannot be combined with response_format: a constrained reply ends with EOS "
                                "as soon as it is complete", param=name)
    return await state.structured.compile(body.response_format)


async def _acquire_generation_model(state: AppState, model: str,
                                    request: Request) -> LoadedAdapter | Combination | None:
    """The adapter, or the combination of adapters ("a:0.7+b:0.3", server/api/combination.py), held: the
    caller releases it; None for the base."""
    if not state.base.can_generate:
        raise ApiError(400, f"base {state.served_name!r} is an encoder; it serves /v1/classify only")
    if model != state.served_name and is_combination(model):
        adapter = await _acquire_combination(state, model)
    else:
        adapter = await state.acquire_model(model)
    request.state.adapter_label = state.adapter_label(adapter)
    if adapter is not None and adapter.task != "completion":
        state.release_model(adapter)
        raise wrong_task(model, adapter.task)
    return adapter


async def _acquire_combination(state: AppState, model: str) -> Combination:
    """A combination's parents, held; 400 where combinations are not served (merge mode, ONNX exports) or
    for more parents than a batch may hold adapters (--max-loras: each parent takes a LoRA slot)."""
    if state.config.merge:
        raise ApiError(400, f"model {model!r} is an adapter combination, which --merge mode does not serve (it "
                            "merges one adapter into the base at a time); merge the adapters into one folder "
                            "(training merge OUT --adapter A=W ... --method cat) and serve that", param="model")
    if state.config.backend != "torch":
        raise ApiError(400, f"model {model!r} is an adapter combination; the {state.config.backend} backend serves "
                            "merged exports, one per model id; export a `training merge` folder instead",
                       param="model")
    ref = parse_combination(model, min(MAX_PARTS, state.config.max_loras))
    return await state.acquire_combination(model, ref)


def _make_job(
    state: AppState, body: SamplingFields, max_tokens: int | None, adapter: LoadedAdapter | None,
    prompt_ids: list[int], chat: bool, logprobs: int | None = None, echo: str | None = None, best: int | None = None,
    constraint: CompiledGrammar | None = None,
) -> GenerationJob:
    """`logprobs`: top alternatives shown per token (None: none); `echo`: the prompt text to prepend;
    `best`: completions' best_of."""
    max_tokens = _completion_budget(state, max_tokens, len(prompt_ids), adapter, "messages" if chat else "prompt")
    if body.min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens={body.min_tokens} is above max_tokens={max_tokens}", param="min_tokens")
    sampled = _sampled_choices(state, body, best)
    stops = body.stop_strings()  # count and length bounded by the schema
    prompt_logprobs = logprobs if echo is not None else None
    if prompt_logprobs is not None and not isinstance(state.scheduler, Scheduler):
        raise ApiError(400, "echo with logprobs is not served on the onnxruntime backend", param="echo")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
        seed=body.seed, stop=stops, ignore_eos=body.ignore_eos, min_tokens=body.min_tokens, n=sampled,
        # best_of ranks by cumulative logprob, so its choices compute their tokens' logprobs even unasked
        logprobs=logprobs if logprobs is not None or sampled == body.n else 0, prompt_logprobs=prompt_logprobs,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0, logit_bias=_logit_bias(state, body.logit_bias),
        constraint=constraint,
    )
    prefix = "chatcmpl" if chat else "cmpl"
    return GenerationJob(f"{prefix}-{uuid.uuid4().hex}", body.model, adapter, prompt_ids, params, chat,
                         time.perf_counter(), returned=body.n, logprobs=logprobs, echo=echo)


def _sampled_choices(state: AppState, body: SamplingFields, best: int | None) -> int:
    """How many sequences the engine samples: best_of if given, else n; each takes a KV slot."""
    if best is not None and best < body.n:
        raise ApiError(400, f"best_of={best} must be at least n={body.n}", param="best_of")
    if best is not None and best > 1 and body.stream:
        raise ApiError(400, "best_of cannot be streamed: the best choices are known only at the end", param="best_of")
    sampled, field = (best, "best_of") if best is not None and best > body.n else (body.n, "n")
    if sampled > 1 and not isinstance(state.scheduler, Scheduler):
        raise ApiError(400, f"{field} above 1 is not served on the onnxruntime backend", param=field)
    if sampled > state.config.max_num_seqs:
        raise ApiError(400, f"{field}={sampled} is above this server's limit of {state.config.max_num_seqs} sequences "
                            "at once (--max-num-seqs)", param=field)
    return sampled


def _logit_bias(state: AppState, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """The schema checked the keys are decimal ids and the values in range; here, that each id exists."""
    if not bias:
        return ()
    vocab = len(state.base.tokenizer)
    unknown = [key for key in bias if int(key) >= vocab]
    if unknown:
        raise ApiError(400, f"logit_bias names token ids this model does not have ({', '.join(unknown[:5])}); "
                            f"its ids are 0..{vocab - 1}", param="logit_bias")
    return tuple(sorted((int(key), value) for key, value in bias.items()))


def _completion_budget(state: AppState, max_tokens: int | None, prompt_tokens: int,
                       adapter: LoadedAdapter | None, prompt_field: str) -> int:
    """The request's max_tokens, checked against the context, which holds the prompt-learning adapter's
    virtual tokens as well (a prompt-tuning or prefix adapter's V positions come first). With max_tokens
    omitted it is min(default_max_tokens, the room left), and at least one token of room must be left."""
    context, limit = state.max_model_len, state.config.max_tokens_limit
    virtual = getattr(adapter, "num_virtual_tokens", 0)  # the onnxruntime backend's exports have none
    used = prompt_tokens + virtual
    in_prompt = f"{prompt_tokens} in the prompt" + (f", {virtual} virtual tokens of adapter {adapter.name!r}"
                                                    if virtual else "")
    if max_tokens is None:
        if used >= context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, your prompt "
                                f"uses {used} tokens ({in_prompt}), which leaves no room for a completion. "
                                f"Shorten the prompt.", param=prompt_field)
        return min(state.config.default_max_tokens, context - used)
    if max_tokens > limit:
        raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit of {limit}", param="max_tokens")
    if used + max_tokens > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{used + max_tokens} tokens ({in_prompt}, {max_tokens} in the completion). "
                            f"Shorten the prompt or lower max_tokens.", param="max_tokens")
    return max_tokens


async def _respond(state: AppState, job: GenerationJob, body: SamplingFields, request: Request, response: Response):
    version = {} if job.adapter is None else {VERSION_HEADER: str(job.adapter.version)}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # The middleware would time only the response headers; the stream records its own end-to-end latency.
        request.state.latency_recorded_by_route = True
        latency = state.metrics.request_latency.labels(request.scope["route"].path, request.state.adapter_label)
        submission = _Submission(state, job)
        return StreamingResponse(_sse(submission, include_usage, latency), media_type="text/event-stream",
                                 headers=version)
    response.headers.update(version)
    submission = _Submission(state, job)
    try:
        deltas = [d async for d in _until_disconnect(submission.deltas(), request)]
    except GenerationFailed as exc:  # 504 past --request-timeout, 503 at shutdown, else 500
        raise engine_error(exc.__cause__, "generation failed") from exc
    finally:
        submission.close()
    choices = collect(deltas, job.params.n)
    if job.returned < job.params.n:
        choices = best_of(choices, job.returned)
    completion_tokens = sum(c.completion_tokens for c in choices)  # of the choices returned (vLLM's count)
    usage = {
        "prompt_tokens": len(job.prompt_ids), "completion_tokens": completion_tokens,
        "total_tokens": len(job.prompt_ids) + completion_tokens,
    }
    shown = LogprobFormat(state.base.tokenizer) if job.logprobs is not None else None
    answers = answer_choices(choices, job.chat, shown, job.echo, job.prompt_ids)
    return {
        "id": job.request_id, "object": "chat.completion" if job.chat else "text_completion",
        "created": int(time.time()), "model": job.model, "choices": answers, "usage": usage,
    }


def _is_eos(delta: TextDelta) -> bool:
    """The step that sampled an end-of-sequence token: it ends the request but is not completion text."""
    return delta.eos


class _Submission:
    """A request handed to the scheduler, and the asyncio queue its outputs arrive on.

    It owns the request's hold on its adapter from construction on: `close()` (idempotent) cancels the
    request if it still runs and releases the adapter.
    """

    def __init__(self, state: AppState, job: GenerationJob) -> None:
        self.state, self.job = state, job
        self._closed = False
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TextDelta | BaseException] = asyncio.Queue()
        self.label = state.adapter_label(job.adapter)
        self.request = GenerationRequest(
            job.prompt_ids, job.params, job.adapter,
            emit=lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item),
        )
        try:
            if state.scheduler is None:
                raise ApiError(400, f"base {state.served_name!r} does not generate")
            state.scheduler.submit(self.request)
        except QueueFullError as exc:
            self.close()
            raise ApiError(429, f"server is busy: {exc}", "rate_limit_error", {"Retry-After": RETRY_AFTER_S}) from exc
        except BaseException:
            self.close()
            raise
        state.metrics.prompt_tokens.labels(self.label).inc(len(job.prompt_ids))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.request.cancel()
            self.state.release_model(self.job.adapter)

    async def deltas(self) -> AsyncIterator[TextDelta]:
        """The request's deltas (every choice's) until each choice has finished; cancelling or closing this
        iterator frees its slots."""
        metrics, last, unfinished = self.state.metrics, {}, self.job.params.n
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise GenerationFailed() from item
                now = time.perf_counter()
                if not last:
                    metrics.time_to_first_token.labels(self.label).observe(now - self.job.started)
                    if self.request.admitted is not None:
                        metrics.queue_time.labels(self.label).observe(self.request.admitted - self.request.submitted)
                elif item.index in last:
                    metrics.inter_token_latency.labels(self.label).observe(now - last[item.index])
                last[item.index] = now
                if not _is_eos(item):
                    metrics.generation_tokens.labels(self.label).inc()
                yield item
                if item.finish_reason is not None:
                    unfinished -= 1
                    if not unfinished:
                        metrics.e2e_latency.labels(self.label).observe(now - self.job.started)
                        return
        finally:
            self.close()


class GenerationFailed(Exception):
    """The scheduler failed this request's step (logged there); the client gets a 500 without details."""


async def _until_disconnect(deltas: AsyncIterator[TextDelta], request: Request) -> AsyncIterator[TextDelta]:
    """Pass deltas through; stop (and so free the request's slot) if the client has gone away."""
    pending = asyncio.ensure_future(anext(deltas, None))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
            if not done:
                if await request.is_disconnected():
                    return
                continue
            delta = pending.result()
            if delta is None:
                return
            yield delta
            pending = asyncio.ensure_future(anext(deltas, None))
    finally:
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending
        await deltas.aclose()


async def _sse(submission: _Submission, include_usage: bool, latency) -> AsyncIterator[str]:
    """One chunk per delta that shows text or a finish, per choice (`index`); the logprobs of tokens whose
    text was held back (a partial character, a possible stop string) go with the choice's next chunk.
    With echo, a choice's first chunk starts with the prompt (and its logprobs)."""
    job = submission.job
    created = int(time.time())
    kind = "chat.completion.chunk" if job.chat else "text_completion"
    gen = submission.deltas()
    completion_tokens = 0
    shown = LogprobFormat(submission.state.base.tokenizer) if job.logprobs is not None else None
    logprobs = StreamedLogprobs(shown, job.chat, job.params.n, job.prompt_ids)
    started = [False] * job.params.n

    def chunk(choice: dict, usage: dict | None = None) -> str:
        payload = {"id": job.request_id, "object": kind, "created": created, "model": job.model,
                   "choices": [choice] if choice else []}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if job.chat:
            for index in range(job.params.n):
                yield chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for delta in gen:
            index, text, prompt = delta.index, delta.text, None
            if not _is_eos(delta):
                completion_tokens += 1
            logprobs.add(delta)
            if not started[index]:
                started[index] = True
                if job.echo is not None:
                    text, prompt = job.echo + text, delta.prompt_logprobs
            if not text and delta.finish_reason is None:
                continue
            shown_part = logprobs.take(index, prompt)
            if job.chat:
                yield chunk({"index": index, "delta": {"content": text} if text else {}, "logprobs": shown_part,
                             "finish_reason": delta.finish_reason})
            else:
                yield chunk({"index": index, "text": text, "finish_reason": delta.finish_reason, "logprobs": shown_part})
        if include_usage:
            usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion_tokens,
                     "total_tokens": len(job.prompt_ids) + completion_tokens}
            yield chunk({}, usage)
        yield "data: [DONE]\n\n"
    except GenerationFailed as exc:
        error = engine_error(exc.__cause__, "generation failed")
        yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind, 'code': error.status}})}\n\n"
    finally:
        await gen.aclose()
        submission.close()
        latency.observe(time.perf_counter() - job.started)
