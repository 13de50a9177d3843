"""Continuous batching: requests join and leave the running batch at every step.

One background thread owns the model. Each step it (1) drops cancelled requests, (2) admits waiting
requests under a slot budget, a prefill-token budget and an adapter budget, (3) prefills the admitted
ones in one batched forward, and (4) decodes one token for every running request in one batched
forward, whatever adapter each uses. Outputs go back through each request's `emit` callback.
Running sequences keep KV slots 0..n-1 in order, so the decode step reads the cache without a gather.

A request with `params.n > 1` (n choices, or best_of) takes n slots at admission: its prompt is
prefilled once, in the first choice's slot, whose KV is then copied into the others' (SlotKVCache.copy_slot);
every choice samples its first token from that one prefill's logits and decodes on as a row of its own.

Every request gets exactly one ending: a delta with a finish reason for each of its choices, or one
exception through `emit` (RequestTimedOut past `request_timeout`, EngineStopped at shutdown or abort,
the step's error), queued requests included.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.config import config_default
from server.engine.base_model import BaseModel
from server.engine.batch_runner import BatchRunner, RowInput, StepLogits
from server.engine.decode_state import DecodeState, TextDelta, step_rows
from server.engine.generate import eos_ids
from server.engine.host import upload
from server.engine.loaded import LoadedAdapter
from server.engine.logprobs import TokenLogprob, prompt_logprobs
from server.engine.merge_mode import Merger
from server.engine.sampling import SamplingParams
from server.engine.worker import EngineStopped, ModelWorker, QueueFullError, RequestTimedOut

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05
__all__ = ["GenerationRequest", "QueueFullError", "Scheduler", "SchedulerLimits"]  # QueueFullError: worker.py's


@dataclass(frozen=True)
class SchedulerLimits:
    max_running: int = config_default("max_num_seqs")  # KV slots: requests decoding at once
    max_waiting: int = config_default("max_waiting")  # bounded queue; beyond it submit() raises QueueFullError
    max_len: int = config_default("max_model_len")  # prompt + completion tokens per request (KV slot length)
    # prompt tokens prefilled in one step (a longer lone prompt still runs)
    prefill_token_budget: int = config_default("max_num_batched_tokens")
    max_adapters_per_batch: int = config_default("max_loras")  # distinct adapters in the running batch


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: LoadedAdapter | None  # pinned at submit: a replaced adapter does not change a running request
    emit: Callable[[TextDelta | BaseException], None]  # called on the scheduler thread; deltas carry `index`
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    deadline: float | None = None  # on the scheduler's clock; set by submit() when a request timeout is on
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class _Running:
    request: GenerationRequest
    state: DecodeState
    slot: int
    length: int  # tokens in this slot's cache
    next_token: int | None = None  # sampled, not yet in the cache
    choice: int = 0  # which of the request's n sequences; choice 0's row prefills the prompt for all


@dataclass
class SchedulerStats:
    """Read by the metrics collector; written only by the scheduler thread."""

    running: int = 0
    waiting: int = 0
    kv_tokens: int = 0
    kv_capacity: int = 0
    steps: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)


class Scheduler(ModelWorker):
    def __init__(self, base: BaseModel, limits: SchedulerLimits, model_lock: threading.Lock,
                 on_step: Callable[[str, int, float], None] | None = None, merge: bool = False,
                 threads: int | None = None, request_timeout: float = 0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """`request_timeout` (seconds, 0: none) bounds a request's time from `submit` to its last token;
        past it the request is failed with RequestTimedOut and its slot is freed. `clock` is for tests."""
        super().__init__(base, model_lock, "loraplex-scheduler", threads)
        self.request_timeout = request_timeout
        self.clock = clock
        self.merger = Merger(base) if merge else None  # merge mode: one adapter in the weights at a time
        self.limits = limits
        self.runner = BatchRunner(base, limits.max_running, limits.max_len)
        self.eos_ids = eos_ids(base)
        self.on_step = on_step  # (phase, batch size, seconds): metrics hook
        self.stats = SchedulerStats(kv_capacity=limits.max_running * limits.max_len)
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._running: list[_Running] = []

    def stop(self) -> None:
        super().stop()
        if self.merger is not None:  # leave the shared base as it was found
            with self.model_lock:
                self.merger.switch_to(None)

    def submit(self, request: GenerationRequest) -> None:
        virtual = request.adapter.num_virtual_tokens if request.adapter is not None else 0
        if virtual + len(request.prompt_ids) + request.params.max_tokens > self.limits.max_len:
            extra = f" (with the adapter's {virtual} virtual tokens)" if virtual else ""
            raise ValueError(f"prompt + max_tokens exceeds {self.limits.max_len} tokens{extra}")
        if request.params.n > self.limits.max_running:
            raise ValueError(f"n={request.params.n} is above the {self.limits.max_running} sequences that run at once")
        with self._cond:
            self._check_open()
            if len(self._waiting) >= self.limits.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting already")
            if self.request_timeout:
                request.deadline = self.clock() + self.request_timeout
            self._waiting.append(request)
            self.stats.waiting = len(self._waiting)
            self._cond.notify()

    # -- the loop (scheduler thread only) ------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait(IDLE_WAIT_S)
                if self._stop:
                    break
                if self._abort_pending:
                    self._fail_all(self._refusal)
                    self._abort_pending = False
                self._expire()
                admitted = self._admit()
            self._drop_cancelled()
            if admitted and self.merger is not None and admitted[0].request.adapter is not self.merger.merged:
                with self.model_lock:  # only reached with an empty running batch (see _admit)
                    self.merger.switch_to(admitted[0].request.adapter)
            if admitted:
                self._prefill(admitted)
            decoding = [r for r in self._running if r.next_token is not None and not r.state.finished
                        and r not in admitted]
            if decoding:
                self._decode(decoding)
            self._compact()
            self.stats.steps += 1
            self.stats.running = len(self._running)
            self.stats.kv_tokens = sum(r.length for r in self._running)
        with self._cond:
            self._fail_all(EngineStopped("the server is shutting down"))

    def _fail_all(self, reason: BaseException) -> None:
        """End every waiting and running request with `reason` (caller holds `_cond`); the next
        `_compact` frees the running ones' slots."""
        while self._waiting:
            request = self._waiting.popleft()
            if not request.cancelled:
                request.emit(reason)
        for request in _unfinished_requests(self._running):
            self._end(request, reason)
        self.stats.waiting = 0

    def _end(self, request: GenerationRequest, reason: BaseException) -> None:
        """Fail a running request with `reason`, once, and finish every one of its choices' rows."""
        request.emit(reason)
        for running in self._running:
            if running.request is request:
                running.state.finished = True
                running.next_token = None

    def _expire(self) -> None:
        """Fail the requests past their deadline, waiting and running (caller holds `_cond`)."""
        if not self.request_timeout:
            return
        now = self.clock()
        expired = [r for r in self._waiting if r.deadline is not None and r.deadline <= now]
        for request in expired:
            self._waiting.remove(request)
            if not request.cancelled:
                request.emit(RequestTimedOut(self.request_timeout))
        for request in _unfinished_requests(self._running):
            if request.deadline is not None and request.deadline <= now:
                self._end(request, RequestTimedOut(self.request_timeout))

    def _admit(self) -> list[_Running]:
        """Move waiting requests into free slots, FIFO, within the budgets (caller holds the lock)."""
        admitted: list[_Running] = []
        budget = self.limits.prefill_token_budget
        # a combination counts each parent: each takes a LoRA slot (loaded.Combination.members)
        adapters = {id(a) for r in self._running if r.request.adapter is not None for a in r.request.adapter.members}
        while self._waiting and len(self._running) < self.limits.max_running:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft()
                continue
            if len(self._running) + request.params.n > self.limits.max_running:
                break  # FIFO: a request waits for all of its choices' slots
            cost = len(request.prompt_ids) + _virtual_tokens(request.adapter)  # prefilled once for any n
            if admitted and cost > budget:
                break
            if self.merger is not None and not self._merge_compatible(request):
                break
            new_adapters = {id(a) for a in request.adapter.members} - adapters if request.adapter is not None else set()
            if new_adapters and adapters and len(adapters | new_adapters) > self.limits.max_adapters_per_batch:
                break
            self._waiting.popleft()
            request.admitted = time.perf_counter()
            adapters |= new_adapters
            budget -= cost
            prefix = request.adapter.num_virtual_tokens if request.adapter is not None and request.adapter.prefix else 0
            for choice in range(request.params.n):
                state = DecodeState(request.params, self.tokenizer, self.eos_ids, self.base.backend.device,
                                    request.prompt_ids, choice)
                running = _Running(request, state, slot=len(self._running), length=prefix,  # a prefix fills 0..V-1
                                   choice=choice)
                self._running.append(running)
                admitted.append(running)
        self.stats.waiting = len(self._waiting)
        return admitted

    def _merge_compatible(self, request: GenerationRequest) -> bool:
        """Merge mode admits one adapter at a time: the merged one while anything runs; else the head's."""
        if self._running:  # already holds this round's admissions too
            return request.adapter is self._running[0].request.adapter
        return True

    def _prefill(self, admitted: list[_Running]) -> None:
        """One forward over the admitted requests' prompts (choice 0's rows); every choice then samples its
        first token from its request's logits, the other choices' slots holding a copy of choice 0's KV."""
        started = time.perf_counter()
        merged = self.merger is not None  # the adapter is in the weights: rows run as plain base rows
        firsts = [r for r in admitted if r.choice == 0]
        inputs = [
            RowInput(r.slot, r.length, _prefill_tokens(r.request), None if merged else r.request.adapter,
                     prompt=r.request.adapter if _virtual_tokens(r.request.adapter) else None,
                     every_position=r.request.params.prompt_logprobs is not None)
            for r in firsts
        ]
        logits = self._forward("prefill", firsts, inputs)
        if logits is None:
            return
        rows: list[_Running] = []  # every admitted choice, each beside its request's row of `logits`
        row_index: list[int] = []
        prompts: list[tuple[TokenLogprob | None, ...] | None] = []
        for index, (first, row) in enumerate(zip(firsts, inputs)):
            first.length += len(row.tokens)
            others = [r for r in admitted if r.request is first.request and r.choice > 0]
            if others:
                self.runner.cache.copy_slot(first.slot, [r.slot for r in others], first.length)
            prompt = None
            if index in logits.every:
                prompt = _prompt_logprobs(first.request, logits.every[index], len(row.tokens))
            for running in (first, *others):
                running.length = first.length
                rows.append(running)
                row_index.append(index)
                prompts.append(prompt)
        last = logits.last
        if row_index != list(range(len(last))):  # n > 1: the choices repeat their request's row
            last = last.index_select(0, upload(torch.tensor(row_index), last.device))
        self._step(rows, last, prompts)
        if self.on_step is not None:
            self.on_step("prefill", len(firsts), time.perf_counter() - started)

    def _decode(self, rows: list[_Running]) -> None:
        started = time.perf_counter()
        merged = self.merger is not None
        inputs = [RowInput(r.slot, r.length, [r.next_token], None if merged else r.request.adapter) for r in rows]
        logits = self._forward("decode", rows, inputs)
        if logits is None:
            return
        for running in rows:
            running.length += 1
        self._step(rows, logits.last)
        if self.on_step is not None:
            self.on_step("decode", len(rows), time.perf_counter() - started)

    def _forward(self, phase: str, rows: list[_Running], inputs: list[RowInput]) -> StepLogits | None:
        """The batched forward; None when it failed, after failing its requests (never the server)."""
        try:
            with self.model_lock:
                return self.runner.forward_full(inputs)
        except Exception as exc:
            log.exception("%s step failed for %d requests", phase, len(rows))
            for request in _unfinished_requests(rows):
                self._end(request, exc)
            return None

    @staticmethod
    def _step(rows: list[_Running], logits: torch.Tensor,
              prompts: list[tuple[TokenLogprob | None, ...] | None] | None = None) -> None:
        """Sample every row's next token in one batched call and emit one delta per row.
        logits: [len(rows), vocab], row i for rows[i]; prompts: each row's prompt logprobs, if any."""
        deltas = step_rows([r.state for r in rows], logits)
        for i, (running, delta) in enumerate(zip(rows, deltas)):
            if prompts is not None and prompts[i] is not None:
                delta = dataclasses.replace(delta, prompt_logprobs=prompts[i])
            running.next_token = None if running.state.finished else delta.token_id
            running.request.emit(delta)

    def _drop_cancelled(self) -> None:
        for running in self._running:
            if running.request.cancelled:
                running.state.finished = True
                running.next_token = None

    def _compact(self) -> None:
        """Free the slots of finished requests, moving the last running rows into the holes."""
        alive = [r for r in self._running if not r.state.finished]
        if len(alive) == len(self._running):
            return
        for new_slot, running in enumerate(alive):
            if running.slot != new_slot:
                self.runner.cache.copy_slot(running.slot, [new_slot], running.length)
                running.slot = new_slot
        self._running = alive


def _virtual_tokens(adapter: LoadedAdapter | None) -> int:
    return adapter.num_virtual_tokens if adapter is not None else 0


def _prefill_tokens(request: GenerationRequest) -> list[int]:
    """The prompt, after prompt tuning's virtual-token placeholders (their embeddings are the adapter's)."""
    adapter = request.adapter
    if adapter is not None and adapter.virtual_tokens is not None:
        return [0] * adapter.num_virtual_tokens + request.prompt_ids
    return request.prompt_ids


def _unfinished_requests(rows: list[_Running]) -> list[GenerationRequest]:
    """The distinct requests with a choice still running among `rows`, in order."""
    return list({id(r.request): r.request for r in rows if not r.state.finished}.values())


def _prompt_logprobs(request: GenerationRequest, logits, row_tokens: int) -> tuple[TokenLogprob | None, ...]:
    """The prompt's logprobs from its prefill row's logits at every position ([row_tokens, vocab]); prompt
    tuning's placeholders come first in the row, and the last position predicts the first new token."""
    start = row_tokens - len(request.prompt_ids)
    return prompt_logprobs(logits[start : row_tokens - 1], request.prompt_ids, request.params.prompt_logprobs)
