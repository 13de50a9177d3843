"""Batches the encoder's work, classification and embedding requests of any adapters, that arrive together.

A background thread takes whatever is queued, up to `max_batch_texts` rows (texts or token-id inputs) of
both kinds in arrival order, runs one forward per kind present (`classify_rows` for the ClassifyJobs,
`embed_rows` for the EmbedJobs, each with every row's own adapter), and hands each request its slice of the
results. A lone request is served at once.

Why one queue and one thread for both kinds, and not a second batcher: forwards on the one model are
serialized by `model_lock` anyway, and a second worker thread would bring a second OpenMP thread team to
contend for the same cores (worker.py: forwards 1.5x slower on 2 cores). Why one forward per kind and not one
for both: classification pools BERT's pooler output (or a decoder's last token) of texts it truncates, while
embeddings mean-pool token ids the route checked; a mixed forward would only save a forward when both kinds
arrive together, and each path stays identical to its single-kind reference.

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
from typing import Callable, ClassVar

import torch

from server.config import config_default
from server.engine.base_model import BaseModel
from server.engine.classify import Classification, classify_rows
from server.engine.embed import EmbeddingSpec, embed_rows, embedding_spec
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
    phase: ClassVar[str] = "classify"  # the batch-size metric's label

    @property
    def rows(self) -> int:
        return len(self.texts)


@dataclass(eq=False)
class EmbedJob:
    token_ids: list[list[int]]  # per input, special tokens included, within the spec's max_length (the route checks)
    adapter: LoadedAdapter | None  # None: the base alone
    done: Callable[[torch.Tensor | BaseException], None]  # [rows, dimensions] float32; on the batcher thread
    deadline: float | None = None
    phase: ClassVar[str] = "embed"

    @property
    def rows(self) -> int:
        return len(self.token_ids)


EncoderJob = ClassifyJob | EmbedJob


class ClassifyBatcher(ModelWorker):
    """The encoder work queue (classification on any base, embeddings on an encoder base).

    `on_batch(phase, rows)`: after each forward, phase "classify" or "embed". `embedding`: how this base's
    embeddings are made (None on a causal LM base), read once here from its folder; the route checks
    inputs against it."""

    def __init__(self, base: BaseModel, model_lock: threading.Lock, max_batch_texts: int, max_length: int,
                 on_batch: Callable[[str, int], None] | None = None, threads: int | None = None,
                 max_waiting: int = DEFAULT_MAX_WAITING, request_timeout: float = 0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(base, model_lock, "loraplex-classify", threads)
        self.max_waiting = max_waiting
        self.request_timeout = request_timeout  # seconds, 0: none
        self.clock = clock
        self.max_batch_texts = max_batch_texts
        self.max_length = max_length
        self.on_batch = on_batch
        self.embedding: EmbeddingSpec | None = embedding_spec(base)
        self._queue: collections.deque[EncoderJob] = collections.deque()

    def submit(self, job: EncoderJob) -> None:
        with self._cond:
            self._check_open()
            if isinstance(job, EmbedJob) and self.embedding is None:
                raise ValueError("this base is a causal LM; it serves no embeddings")
            if len(self._queue) >= self.max_waiting:
                raise QueueFullError(f"{len(self._queue)} classification or embedding requests are waiting already")
            if self.request_timeout:
                job.deadline = self.clock() + self.request_timeout
            self._queue.append(job)
            self._cond.notify()

    def _take(self) -> list[EncoderJob]:
        """The next batch, in arrival order, after failing the queued jobs past their deadline."""
        if self.request_timeout:
            now = self.clock()
            for job in [j for j in self._queue if j.deadline is not None and j.deadline <= now]:
                self._queue.remove(job)
                job.done(RequestTimedOut(self.request_timeout))
        jobs, rows = [], 0
        while self._queue and (not jobs or rows + self._queue[0].rows <= self.max_batch_texts):
            job = self._queue.popleft()
            jobs.append(job)
            rows += job.rows
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
            for phase in (ClassifyJob.phase, EmbedJob.phase):
                batch = [job for job in jobs if job.phase == phase]
                if batch:
                    self._run(phase, batch)
        with self._cond:
            self._fail_queued(EngineStopped("the server is shutting down"))

    def _run(self, phase: str, jobs: list[EncoderJob]) -> None:
        """One forward for `jobs` (all of one phase); each job gets its slice, or the batch's exception."""
        rows = sum(job.rows for job in jobs)
        try:
            with self.model_lock:
                if phase == ClassifyJob.phase:
                    texts = [t for job in jobs for t in job.texts]
                    adapters = [job.adapter for job in jobs for _ in job.texts]
                    results = classify_rows(self.base, texts, adapters, self.max_length, self.tokenizer)
                else:
                    token_ids = [ids for job in jobs for ids in job.token_ids]
                    adapters = [job.adapter for job in jobs for _ in job.token_ids]
                    results = embed_rows(self.base, token_ids, adapters, self.embedding)
        except Exception as exc:  # a failed batch fails its requests, never the server
            log.exception("%s batch of %d rows failed", phase, rows)
            for job in jobs:
                job.done(exc)
            return
        if self.on_batch is not None:
            self.on_batch(phase, rows)
        offset = 0
        for job in jobs:
            job.done(results[offset:offset + job.rows])
            offset += job.rows

    def _fail_queued(self, reason: BaseException) -> None:
        """Caller holds `_cond`."""
        while self._queue:
            self._queue.popleft().done(reason)
