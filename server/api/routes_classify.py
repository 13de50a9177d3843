"""POST /v1/classify {model, input: str | [str]} -> {data: [{index, label, probs}], usage}."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.batched import run_batched
from server.api.errors import ApiError, engine_error, wrong_task
from server.api.schemas import ClassifyItem, ClassifyRequest, ClassifyResponse, Usage, error_responses
from server.api.state import AppState, State
from server.engine.classify_batcher import ClassifyJob
from server.engine.loaded import LoadedAdapter

router = APIRouter(tags=["classification"], responses=error_responses(400, 404, 409, 429, 500, 503, 504))


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request, state: State) -> ClassifyResponse:
    if state.config.merge:
        raise ApiError(400, "classification is not served in --merge mode (the base weights hold an adapter)")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(400, "input must hold at least one text")
    if len(texts) > state.config.max_classify_batch:
        raise ApiError(400, f"input holds {len(texts)} texts; this server takes at most "
                            f"{state.config.max_classify_batch} per request (max_classify_batch)")
    if any(not t for t in texts):
        raise ApiError(400, "inputs must not be empty strings")
    adapter = await state.acquire_model(body.model)
    try:
        return await _classify(state, body, texts, adapter, request)
    finally:
        state.release_model(adapter)


async def _classify(state: AppState, body: ClassifyRequest, texts: list[str], adapter: LoadedAdapter | None,
                    request: Request) -> ClassifyResponse:
    request.state.adapter_label = state.metrics.adapter_label(adapter.name if adapter else None)
    adapter = adapter or state.base_classifier  # a base that is a trained classifier (a full fine-tune) has a head
    if adapter is None:
        raise ApiError(400, f"the base {body.model!r} has no classification head; name a classification adapter")
    if adapter.task != "classification":
        raise wrong_task(body.model, adapter.task)
    max_length = state.config.classify_max_length
    tokens = sum(len(ids[:max_length]) for ids in state.base.tokenizer(texts)["input_ids"])

    outcome = await run_batched(state.classifier, lambda done: ClassifyJob(texts, adapter, done))
    if isinstance(outcome, BaseException):
        raise engine_error(outcome, "classification failed") from outcome
    results = outcome
    state.metrics.classified_inputs.labels(request.state.adapter_label).inc(len(texts))
    state.metrics.prompt_tokens.labels(request.state.adapter_label).inc(tokens)
    return ClassifyResponse(
        model=body.model,
        data=[ClassifyItem(index=i, label=r.label, probs=r.probs) for i, r in enumerate(results)],
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )
