"""`response_format` at the HTTP edge: compiled off the event loop into the grammar the engine applies per row.

The compiler (server/engine/grammar.py) reads the base's vocabulary once, on the first request that asks
for structured output (about 0.5 s, after xgrammar's import, about 6 s on the 2-core box), so a server that never sees one pays nothing. Every failure the user
can cause (an unknown type, a schema the grammar library cannot compile, one over the size bounds, one
that takes too long to compile) is a 400 naming `response_format`; nothing reaches the scheduler.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Mapping

from starlette.concurrency import run_in_threadpool

from server.api.errors import ApiError

if TYPE_CHECKING:  # xgrammar takes about 6 s to import: only a server that gets a response_format pays it
    from server.engine.grammar import CompiledGrammar, GrammarCompiler

COMPILE_TIMEOUT_S = 30.0  # a compile still running then finishes in the background and is cached for a retry


class StructuredOutput:
    """One per app on a torch causal-LM base: the lazily built compiler, and the route's compile call."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                from server.engine.grammar import GrammarCompiler

                self._compiler = GrammarCompiler.for_base(self.base)
            return self._compiler

    def compile_now(self, response_format: Mapping[str, Any]) -> CompiledGrammar | None:
        """In the calling thread; ValueError for a format the user must change."""
        return self.compiler().compile_openai(response_format)

    async def compile(self, response_format: Mapping[str, Any]) -> CompiledGrammar | None:
        """The grammar of a response_format (None for `{"type": "text"}`: nothing to constrain)."""
        try:
            return await asyncio.wait_for(run_in_threadpool(self.compile_now, response_format), COMPILE_TIMEOUT_S)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="response_format") from exc
        except asyncio.TimeoutError as exc:
            raise ApiError(400, f"response_format took more than {COMPILE_TIMEOUT_S:.0f} s to compile; simplify "
                                "the schema (long minLength/maxLength bounds are the usual cause)",
                           param="response_format") from exc
