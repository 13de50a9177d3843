"""The thread that owns batched forwards on the shared model (the scheduler, the classify batcher)."""

from __future__ import annotations

import copy
import logging
import threading

import torch

from server.engine.base_model import BaseModel

JOIN_TIMEOUT_S = 30

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """A worker's queue is at its bound; the client should retry later (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The server is shutting down: the request was not served, or not to the end (HTTP 503)."""


class RequestTimedOut(RuntimeError):
    """The request ran past the server's request timeout; its slot was freed (HTTP 504)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request took longer than this server's request timeout of {timeout_s:g} s")
        self.timeout_s = timeout_s


class ModelWorker:
    """Start/stop a daemon thread running `_loop`; `_cond` wakes it, `_stop` ends it.

    Each worker keeps its own tokenizer copy: HF fast tokenizers must not be used from two threads.
    Every forward it runs holds `model_lock`, which all users of the one model share.

    The thread sets its own intra-op thread count (`threads`, default: the creating thread's): with
    OpenMP each thread has its own count and its own thread team. On this project's 2-core machine a
    worker thread's forwards ran about 1.5x slower (small batched matmuls 4-10x) once another thread had
    run a multi-threaded op, so `server serve` loads the model with 1 thread in the main thread and
    leaves the cores to the worker (cli.py).

    `abort(reason)` fails every queued and running item with `reason` and refuses new ones from then on:
    the shutdown's last resort when `shutdown_timeout` runs out, so that every client gets an answer.
    The loops act on it at their next step (`_abort_pending`); `submit` calls `_check_open`.

    Work items fail on their own (the loops catch per batch); should the loop itself ever raise, the
    thread logs it and `failure` says why, which /health reports as 503 so that a supervisor restarts
    the server instead of it queueing requests nobody will run.
    """

    def __init__(self, base: BaseModel, model_lock: threading.Lock, thread_name: str,
                 threads: int | None = None) -> None:
        self.base = base
        self.threads = threads or torch.get_num_threads()
        self.model_lock = model_lock
        self.tokenizer = copy.deepcopy(base.tokenizer)
        self._cond = threading.Condition()
        self._stop = False
        self._refusal: BaseException | None = None  # set by abort(): why new items are refused
        self._abort_pending = False  # abort() was called; the loop has not failed its items yet
        self.failure: str | None = None  # why the thread died, if it did
        self._thread = threading.Thread(target=self._thread_main, name=thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=JOIN_TIMEOUT_S)

    def abort(self, reason: BaseException) -> None:
        with self._cond:
            self._refusal = reason
            self._abort_pending = True
            self._cond.notify()

    def _check_open(self) -> None:
        """Refuse new items once `abort` or `stop` was called (caller holds `_cond`): nothing would run them."""
        if self._refusal is not None:
            raise self._refusal
        if self._stop:
            raise EngineStopped("the server is shutting down")

    @property
    def alive(self) -> bool:
        """False once the thread has died (stopping on purpose is not dying)."""
        return self.failure is None and (self._thread.is_alive() or self._stop or not self._thread.ident)

    def _thread_main(self) -> None:
        try:
            torch.set_num_threads(self.threads)
            self._loop()
        except BaseException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("%s thread died", self._thread.name)

    def _loop(self) -> None:
        raise NotImplementedError
