"""Batches classification requests (of any adapters) that arrive together into one forward.

A background thread takes whatever is queued, up to `max_batch_texts` texts, runs `classify_rows`
once, and hands each request its slice of the results. A lone request is served at once.

The queue is bounded (`max_waiting` requests; beyond it submit() raises QueueFullError, HTTP 429). A
request still queued past `request_timeout` seconds is failed with RequestTimedOut; one whose batch has
started runs to the end (a forward is not interruptible). Every job's `done` is called exactly once,
at shutdown (EngineStopped) included.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from server.config import config_default
from server.engine.base_model import BaseModel
from server.engine.classify import Classification, classify_rows
from server.engine.loaded import LoadedAdapter
from server.engine.worker import EngineStopped, ModelWorker, QueueFullError, RequestTimedOut

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05


DEFAULT_MAX_WAITING = config_default("max_classify_waiting")


@dataclass(eq=False)
class ClassifyJob:
    texts: list[str]
    adapter: LoadedAdapter
    done: Callable[[list[Classification] | BaseException], None]  # called on the batcher thread
    deadline: float | None = None  # on the batcher's clock; set by submit() when a request timeout is on


class ClassifyBatcher(ModelWorker):
    def __init__(self, base: BaseModel, model_lock: threading.Lock, max_batch_texts: int, max_length: int,
                 on_batch: Callable[[int], None] | None = None, threads: int | None = None,
                 max_waiting: int = DEFAULT_MAX_WAITING, request_timeout: float = 0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(base, model_lock, "loraplex-classify", threads)
        self.max_waiting = max_waiting
        self.request_timeout = request_timeout  # seconds, 0: none
        self.clock = clock
        self.max_batch_texts = max_batch_texts
        self.max_length = max_length
        self.on_batch = on_batch
        self._queue: collections.deque[ClassifyJob] = collections.deque()

    def submit(self, job: ClassifyJob) -> None:
        with self._cond:
            self._check_open()
            if len(self._queue) >= self.max_waiting:
                raise QueueFullError(f"{len(self._queue)} classification requests are waiting already")
            if self.request_timeout:
                job.deadline = self.clock() + self.request_timeout
            self._queue.append(job)
            self._cond.notify()

    def _take(self) -> list[ClassifyJob]:
        """The next batch, in arrival order, after failing the queued jobs past their deadline."""
        if self.request_timeout:
            now = self.clock()
            for job in [j for j in self._queue if j.deadline is not None and j.deadline <= now]:
                self._queue.remove(job)
                job.done(RequestTimedOut(self.request_timeout))
        jobs, texts = [], 0
        while self._queue and (not jobs or texts + len(self._queue[0].texts) <= self.max_batch_texts):
            job = self._queue.popleft()
            jobs.append(job)
            texts += len(job.texts)
        return jobs

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._queue:
                    self._cond.wait(IDLE_WAIT_S)
                if self._stop:
                    break
                if self._abort_pending:
                    self._fail_queued(self._refusal)
                    self._abort_pending = False
                jobs = self._take()
            if not jobs:
                continue
            texts = [t for job in jobs for t in job.texts]
            adapters = [job.adapter for job in jobs for _ in job.texts]
            try:
                with self.model_lock:
                    results = classify_rows(self.base, texts, adapters, self.max_length, self.tokenizer)
            except Exception as exc:  # a failed batch fails its requests, never the server
                log.exception("classification batch of %d texts failed", len(texts))
                for job in jobs:
                    job.done(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(len(texts))
            offset = 0
            for job in jobs:
                job.done(results[offset:offset + len(job.texts)])
                offset += len(job.texts)
        with self._cond:
            self._fail_queued(EngineStopped("the server is shutting down"))

    def _fail_queued(self, reason: BaseException) -> None:
        """Caller holds `_cond`."""
        while self._queue:
            self._queue.popleft().done(reason)
