"""Completions on the onnxruntime backend: a worker thread serves queued requests one at a time.

It takes the same GenerationRequest objects as the torch scheduler (the routes do not know which backend
runs), decodes with the same DecodeState (sampling, stop strings, min/max tokens, incremental text), and
reports every forward to the same metrics hook. One request at a time is the simple, obviously-correct
schedule for merged single-adapter models on a CPU; requests beyond --max-waiting get 429.

Every request gets exactly one ending, as on the torch scheduler: a delta with a finish reason, or one
exception through `emit`: RequestTimedOut past `request_timeout` (queued or decoding: the check runs
before every forward), EngineStopped at shutdown or at the drain's abort (ModelWorker.abort), queued
requests included, or the forward's own error.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from adapters import AdapterError
from server.engine.decode_state import DecodeState
from server.engine.scheduler import GenerationRequest
from server.engine.worker import EngineStopped, ModelWorker, QueueFullError, RequestTimedOut
from server.ort.base import OrtBase
from server.ort.decoder import OrtCausalLM
from server.ort.exports import LoadedExport

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05
CPU = torch.device("cpu")

Ending = Callable[[GenerationRequest], BaseException | None]


@dataclass
class GeneratorStats:
    """Read by the metrics collector; written by the worker thread (running) and submit (waiting)."""

    running: int = 0
    waiting: int = 0


def decode(model: OrtCausalLM, request: GenerationRequest, state: DecodeState,
           on_step: Callable[[str, int, float], None] | None = None, lock: threading.Lock | None = None,
           ending: Ending | None = None) -> None:
    """Prefill, then one token per step, emitting each delta, until the request finishes or is cancelled.
    `ending(request)`, asked before every forward (holding `lock`): an exception ends the request with it."""
    cache = model.empty_cache()
    tokens, phase = list(request.prompt_ids), "prefill"
    while not request.cancelled:
        started = time.perf_counter()
        with lock if lock is not None else contextlib.nullcontext():
            reason = ending(request) if ending is not None else None
            if reason is None:
                logits = model.forward(tokens, cache)
        if reason is not None:
            request.emit(reason)
            return
        if on_step is not None:
            on_step(phase, 1, time.perf_counter() - started)
        delta = state.step(torch.from_numpy(logits))
        request.emit(delta)
        if state.finished:
            return
        tokens, phase = [delta.token_id], "decode"


class OrtGenerator(ModelWorker):
    def __init__(self, base: OrtBase, model_lock: threading.Lock, max_waiting: int, max_len: int,
                 on_step: Callable[[str, int, float], None] | None = None, request_timeout: float = 0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """`request_timeout` (seconds, 0: none) bounds a request's time from `submit` to its last token,
        as on the torch scheduler. `clock` is for tests."""
        super().__init__(base, model_lock, "loraplex-ort-generate")  # type: ignore[arg-type]  # needs .tokenizer only
        self.max_waiting = max_waiting
        self.max_len = max_len
        self.on_step = on_step
        self.request_timeout = request_timeout
        self.clock = clock
        self.stats = GeneratorStats()
        self._waiting: collections.deque[GenerationRequest] = collections.deque()

    def submit(self, request: GenerationRequest) -> None:
        if request.adapter is None:
            raise AdapterError(
                f"the onnxruntime backend serves exported adapters; the base {self.base.prepared.name!r} has no "
                "export here: name one of the adapters in /v1/models"
            )
        if len(request.prompt_ids) + request.params.max_tokens > self.max_len:
            raise ValueError(f"prompt + max_tokens exceeds {self.max_len} tokens")
        with self._cond:
            self._check_open()
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting already")
            if self.request_timeout:
                request.deadline = self.clock() + self.request_timeout
            self._waiting.append(request)
            self.stats.waiting = len(self._waiting)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting:
                    self._cond.wait(IDLE_WAIT_S)
                if self._stop:
                    break
                if self._abort_pending:
                    self._fail_waiting(self._refusal)
                    self._abort_pending = False
                self._expire()
                request = self._waiting.popleft() if self._waiting else None
                self.stats.waiting = len(self._waiting)
            if request is not None and not request.cancelled:
                self._serve(request)
        with self._cond:
            self._fail_waiting(EngineStopped("the server is shutting down"))

    def _ending(self, request: GenerationRequest) -> BaseException | None:
        """Why the running request must end before its next forward, if it must (the worker thread)."""
        if self._abort_pending:
            return self._refusal  # the loop fails the queued ones and clears the flag once this one has ended
        if self._stop:
            return EngineStopped("the server is shutting down")
        if request.deadline is not None and request.deadline <= self.clock():
            return RequestTimedOut(self.request_timeout)
        return None

    def _fail_waiting(self, reason: BaseException) -> None:
        """End every queued request with `reason` (caller holds `_cond`)."""
        while self._waiting:
            request = self._waiting.popleft()
            if not request.cancelled:
                request.emit(reason)
        self.stats.waiting = 0

    def _expire(self) -> None:
        """Fail the queued requests past their deadline (caller holds `_cond`)."""
        if not self.request_timeout:
            return
        now = self.clock()
        for request in [r for r in self._waiting if r.deadline is not None and r.deadline <= now]:
            self._waiting.remove(request)
            if not request.cancelled:
                request.emit(RequestTimedOut(self.request_timeout))

    def _serve(self, request: GenerationRequest) -> None:
        export: LoadedExport = request.adapter  # type: ignore[assignment]
        request.admitted = time.perf_counter()
        self.stats.running = 1
        try:
            model = OrtCausalLM(export.session())
            state = DecodeState(request.params, self.tokenizer, set(export.eos_ids), CPU, request.prompt_ids)
            decode(model, request, state, self.on_step, self.model_lock, self._ending)
        except Exception as exc:  # a failed request fails alone, never the server
            log.exception("generation with export %s failed", export.name)
            request.emit(exc)
        finally:
            self.stats.running = 0
