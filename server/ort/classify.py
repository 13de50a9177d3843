"""Classification on the onnxruntime backend: a worker thread batches queued requests per export.

Whatever is queued (up to `max_batch_texts` texts) is taken at once; the texts of requests for the same
export run as one session call, and each request gets its slice of the results back.

As on the torch batcher: the queue holds at most `max_waiting` requests (beyond it submit() raises
QueueFullError, HTTP 429); a request past `request_timeout` seconds before its session call starts is
failed with RequestTimedOut (a call that has started runs to the end); at shutdown and at the drain's
abort every request not yet run is failed with EngineStopped (503). Every job's `done` is called once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import numpy as np
import transformers

from server.engine.classify import Classification
from server.engine.classify_batcher import DEFAULT_MAX_WAITING, ClassifyJob
from server.engine.worker import EngineStopped, ModelWorker, QueueFullError, RequestTimedOut
from server.ort.base import OrtBase
from server.ort.exports import LoadedExport

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05


def classify_with_export(export: LoadedExport, tokenizer: transformers.PreTrainedTokenizerBase, texts: list[str],
                         max_length: int) -> list[Classification]:
    """texts -> label and probabilities per text, from the export's own head and label set."""
    session = export.session()
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    input_ids = batch["input_ids"].astype(np.int64)  # [B, S]
    feed = {}
    for item in session.get_inputs():
        value = batch.get(item.name)
        feed[item.name] = value.astype(np.int64) if value is not None else np.zeros_like(input_ids)
    logits = session.run(["logits"], feed)[0].astype(np.float64)  # [B, num_labels]
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    labels = export.labels
    if probs.shape[-1] != len(labels):
        raise ValueError(f"export {export.name!r} returns {probs.shape[-1]} logits for {len(labels)} labels")
    return [Classification(label=labels[int(row.argmax())], probs={label: float(p) for label, p in zip(labels, row)})
            for row in probs]


class OrtClassifier(ModelWorker):
    def __init__(self, base: OrtBase, model_lock: threading.Lock, max_batch_texts: int, max_length: int,
                 on_batch: Callable[[int], None] | None = None, max_waiting: int = DEFAULT_MAX_WAITING,
                 request_timeout: float = 0, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(base, model_lock, "loraplex-ort-classify")  # type: ignore[arg-type]  # needs .tokenizer only
        self.max_batch_texts = max_batch_texts
        self.max_length = max_length
        self.on_batch = on_batch
        self.max_waiting = max_waiting
        self.request_timeout = request_timeout  # seconds, 0: none
        self.clock = clock
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
        self._queue = collections.deque(self._unexpired(list(self._queue)))
        jobs, texts = [], 0
        while self._queue and (not jobs or texts + len(self._queue[0].texts) <= self.max_batch_texts):
            job = self._queue.popleft()
            jobs.append(job)
            texts += len(job.texts)
        return jobs

    def _unexpired(self, jobs: list[ClassifyJob]) -> list[ClassifyJob]:
        """`jobs` but those past their deadline, which are failed with RequestTimedOut."""
        if not self.request_timeout:
            return jobs
        now = self.clock()
        kept = []
        for job in jobs:
            if job.deadline is not None and job.deadline <= now:
                job.done(RequestTimedOut(self.request_timeout))
            else:
                kept.append(job)
        return kept

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
            by_export: dict[int, list[ClassifyJob]] = collections.defaultdict(list)
            for job in jobs:
                by_export[id(job.adapter)].append(job)
            for group in by_export.values():
                self._run(group)
        with self._cond:
            self._fail_queued(EngineStopped("the server is shutting down"))

    def _fail_queued(self, reason: BaseException) -> None:
        """Caller holds `_cond`."""
        while self._queue:
            self._queue.popleft().done(reason)

    def _ending(self) -> BaseException | None:
        """Why the taken jobs must not run, if they must not: the drain's abort, or the shutdown."""
        if self._abort_pending:
            return self._refusal
        if self._stop:
            return EngineStopped("the server is shutting down")
        return None

    def _run(self, jobs: list[ClassifyJob]) -> None:
        """One session call for `jobs` (one export's), unless the shutdown or their deadline came first:
        the groups of one take run one after another, so a later group may wait on the earlier ones."""
        export: LoadedExport = jobs[0].adapter  # type: ignore[assignment]
        results: list[Classification] | BaseException
        with self.model_lock:
            reason = self._ending()
            if reason is None:
                jobs = self._unexpired(jobs)
                texts = [t for job in jobs for t in job.texts]
                try:
                    results = classify_with_export(export, self.tokenizer, texts, self.max_length) if jobs else []
                except Exception as exc:  # a failed batch fails its requests, never the server
                    log.exception("classification of %d texts with export %s failed", len(texts), export.name)
                    results = exc
        if reason is not None or isinstance(results, BaseException):
            for job in jobs:
                job.done(reason if reason is not None else results)
            return
        if not jobs:
            return
        if self.on_batch is not None:
            self.on_batch(len(texts))
        offset = 0
        for job in jobs:
            job.done(results[offset:offset + len(job.texts)])
            offset += len(job.texts)
