"""The thread that owns batched forwards on the shared model (the scheduler, the classify batcher)."""

from __future__ import annotations

import copy
import threading

from server.engine.base_model import BaseModel

JOIN_TIMEOUT_S = 30


class ModelWorker:
    """Start/stop a daemon thread running `_loop`; `_cond` wakes it, `_stop` ends it.

    Each worker keeps its own tokenizer copy: HF fast tokenizers must not be used from two threads.
    Every forward it runs holds `model_lock`, which all users of the one model share.
    """

    def __init__(self, base: BaseModel, model_lock: threading.Lock, thread_name: str) -> None:
        self.base = base
        self.model_lock = model_lock
        self.tokenizer = copy.deepcopy(base.tokenizer)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=JOIN_TIMEOUT_S)

    def _loop(self) -> None:
        raise NotImplementedError
