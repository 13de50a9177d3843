"""Awaiting a job of the encoder batcher (classification, embeddings) from the event loop.

The batcher runs jobs on its own thread and reports each one's outcome (the result or an exception)
through the job's callback; this turns that callback into an awaitable.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

Done = Callable[[Any], None]


async def run_batched(batcher: Any, make_job: Callable[[Done], Any]) -> Any:
    """Submit `make_job(done)` to `batcher` and wait for its outcome (a result or an exception object).
    `batcher.submit` may raise QueueFullError (a 429, errors.py) before anything is queued."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def done(outcome: Any) -> None:  # on the batcher thread
        loop.call_soon_threadsafe(_settle, future, outcome)

    batcher.submit(make_job(done))
    return await future


def _settle(future: asyncio.Future, outcome: Any) -> None:
    if not future.done():  # the client may have gone away
        future.set_result(outcome)
