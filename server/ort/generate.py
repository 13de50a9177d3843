"""Completions on the onnxruntime backend: a worker thread serves queued requests one at a time.

It takes the same GenerationRequest objects as the torch scheduler (the routes do not know which backend
runs), decodes with the same DecodeState (sampling, stop strings, min/max tokens, incremental text), and
reports every forward to the same metrics hook. One request at a time is the simple, obviously-correct
schedule for merged single-adapter models on a CPU; requests beyond --max-waiting get 429.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from adapters import AdapterError
from server.engine.decode_state import DecodeState
from server.engine.scheduler import GenerationRequest, QueueFullError
from server.engine.worker import ModelWorker
from server.ort.base import OrtBase
from server.ort.decoder import OrtCausalLM
from server.ort.exports import LoadedExport

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05
CPU = torch.device("cpu")


@dataclass
class GeneratorStats:
    """Read by the metrics collector; written by the worker thread (running) and submit (waiting)."""

    running: int = 0
    waiting: int = 0


def decode(model: OrtCausalLM, request: GenerationRequest, state: DecodeState,
           on_step: Callable[[str, int, float], None] | None = None, lock: threading.Lock | None = None) -> None:
    """Prefill, then one token per step, emitting each delta, until the request finishes or is cancelled."""
    cache = model.empty_cache()
    tokens, phase = list(request.prompt_ids), "prefill"
    while not request.cancelled:
        started = time.perf_counter()
        if lock is not None:
            with lock:
                logits = model.forward(tokens, cache)
        else:
            logits = model.forward(tokens, cache)
        if on_step is not None:
            on_step(phase, 1, time.perf_counter() - started)
        delta = state.step(torch.from_numpy(logits))
        request.emit(delta)
        if state.finished:
            return
        tokens, phase = [delta.token_id], "decode"


class OrtGenerator(ModelWorker):
    def __init__(self, base: OrtBase, model_lock: threading.Lock, max_waiting: int, max_len: int,
                 on_step: Callable[[str, int, float], None] | None = None) -> None:
        super().__init__(base, model_lock, "loraplex-ort-generate")  # type: ignore[arg-type]  # needs .tokenizer only
        self.max_waiting = max_waiting
        self.max_len = max_len
        self.on_step = on_step
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
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting already")
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
                request = self._waiting.popleft()
                self.stats.waiting = len(self._waiting)
            if not request.cancelled:
                self._serve(request)
        for request in self._waiting:
            request.emit(RuntimeError("server shutting down"))

    def _serve(self, request: GenerationRequest) -> None:
        export: LoadedExport = request.adapter  # type: ignore[assignment]
        request.admitted = time.perf_counter()
        self.stats.running = 1
        try:
            model = OrtCausalLM(export.session())
            state = DecodeState(request.params, self.tokenizer, set(export.eos_ids), CPU)
            decode(model, request, state, self.on_step, self.model_lock)
        except Exception as exc:  # a failed request fails alone, never the server
            log.exception("generation with export %s failed", export.name)
            request.emit(exc)
        finally:
            self.stats.running = 0
