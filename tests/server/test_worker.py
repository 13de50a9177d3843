"""A model worker thread that dies is noticed: `alive` turns False, `failure` says why, /health answers 503."""

from __future__ import annotations

import threading

from server.engine.worker import ModelWorker


class _Crashing(ModelWorker):
    def _loop(self) -> None:
        raise RuntimeError("boom")


class _Waiting(ModelWorker):
    def _loop(self) -> None:
        with self._cond:
            while not self._stop:
                self._cond.wait()


def test_a_dead_worker_reports_why_and_a_stopped_one_is_not_dead(tiny_llama_base):
    crashing = _Crashing(tiny_llama_base, threading.Lock(), "crashing")
    assert crashing.alive  # not started yet
    crashing.start()
    crashing._thread.join(5)
    assert not crashing.alive and crashing.failure == "RuntimeError: boom"
    waiting = _Waiting(tiny_llama_base, threading.Lock(), "waiting")
    waiting.start()
    assert waiting.alive
    waiting.stop()
    assert waiting.alive and waiting.failure is None


def test_health_is_503_when_the_scheduler_thread_died(llama_client):
    assert llama_client.get("/health").json() == {"status": "ok"}
    scheduler = llama_client.app.state.loraplex.scheduler
    scheduler.failure = "RuntimeError: boom"  # as _thread_main records it (the thread itself: the test above)
    try:
        answer = llama_client.get("/health")
        assert answer.status_code == 503
        assert answer.json() == {"status": "unhealthy", "reason": "worker thread died: RuntimeError: boom"}
    finally:
        scheduler.failure = None
