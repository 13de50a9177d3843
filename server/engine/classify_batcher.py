"""Batches classification requests (of any adapters) that arrive together into one forward.

A background thread takes whatever is queued, up to `max_batch_texts` texts, runs `classify_rows`
once, and hands each request its slice of the results. A lone request is served at once.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Callable

from server.engine.base_model import BaseModel
from server.engine.classify import Classification, classify_rows
from server.engine.loaded import LoadedAdapter
from server.engine.worker import ModelWorker

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05


@dataclass(eq=False)
class ClassifyJob:
    texts: list[str]
    adapter: LoadedAdapter
    done: Callable[[list[Classification] | BaseException], None]  # called on the batcher thread


class ClassifyBatcher(ModelWorker):
    def __init__(self, base: BaseModel, model_lock: threading.Lock, max_batch_texts: int, max_length: int,
                 on_batch: Callable[[int], None] | None = None, threads: int | None = None) -> None:
        super().__init__(base, model_lock, "loraplex-classify", threads)
        self.max_batch_texts = max_batch_texts
        self.max_length = max_length
        self.on_batch = on_batch
        self._queue: collections.deque[ClassifyJob] = collections.deque()

    def submit(self, job: ClassifyJob) -> None:
        with self._cond:
            self._queue.append(job)
            self._cond.notify()

    def _take(self) -> list[ClassifyJob]:
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
                jobs = self._take()
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
        for job in self._queue:
            job.done(RuntimeError("server shutting down"))
