"""Classification on the onnxruntime backend: a worker thread batches queued requests per export.

Whatever is queued (up to `max_batch_texts` texts) is taken at once; the texts of requests for the same
export run as one session call, and each request gets its slice of the results back.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

import numpy as np
import transformers

from server.engine.classify import Classification
from server.engine.classify_batcher import ClassifyJob
from server.engine.worker import ModelWorker
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
                 on_batch: Callable[[int], None] | None = None) -> None:
        super().__init__(base, model_lock, "loraplex-ort-classify")  # type: ignore[arg-type]  # needs .tokenizer only
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
            by_export: dict[int, list[ClassifyJob]] = collections.defaultdict(list)
            for job in jobs:
                by_export[id(job.adapter)].append(job)
            for group in by_export.values():
                self._run(group)
        for job in self._queue:
            job.done(RuntimeError("server shutting down"))

    def _run(self, jobs: list[ClassifyJob]) -> None:
        export: LoadedExport = jobs[0].adapter  # type: ignore[assignment]
        texts = [t for job in jobs for t in job.texts]
        try:
            with self.model_lock:
                results = classify_with_export(export, self.tokenizer, texts, self.max_length)
        except Exception as exc:  # a failed batch fails its requests, never the server
            log.exception("classification of %d texts with export %s failed", len(texts), export.name)
            for job in jobs:
                job.done(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(texts))
        offset = 0
        for job in jobs:
            job.done(results[offset:offset + len(job.texts)])
            offset += len(job.texts)
