"""Client-side timings of one request, as vLLM's `bench serve` defines them, and the SSE reading behind them.

- TTFT: from sending the request to the first streamed chunk that carries text.
- ITL: the gaps between successive text chunks (one chunk per token; a token whose text is held back
  for UTF-8 or a stop string arrives joined to the next, as in vLLM's measurement).
- TPOT: (e2e - TTFT) / (output tokens - 1), output tokens from the stream's usage chunk.
- e2e: from sending to the last byte (to `data: [DONE]` on a stream).

Non-streamed requests give e2e and output tokens only. Plain Python: it runs inside Locust.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

DONE = "[DONE]"
DATA_PREFIX = "data: "


@dataclass
class RequestRecord:
    """One request, written as one JSON line: `started` is wall-clock seconds (for plots over time),
    the durations are from a monotonic clock."""

    started: float
    kind: str  # completion | chat | classify | probe
    model: str
    stream: bool
    status: int
    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> "RequestRecord":
        return cls(**json.loads(line))


@dataclass
class StreamResult:
    text: str = ""
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int | None = None  # from the usage chunk
    done: bool = False
    error: str = ""


def read_sse(lines: Iterable[bytes | str], sent: float, clock: Callable[[], float], chat: bool) -> StreamResult:
    """Read an OpenAI-style event stream (completions or chat chunks) up to `data: [DONE]`, timing each
    text chunk with `clock` against `sent`. An error event ends it with `error` set."""
    result, last = StreamResult(), None
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith(DATA_PREFIX):
            continue
        payload = line[len(DATA_PREFIX):]
        if payload == DONE:
            result.done = True
            break
        chunk = json.loads(payload)
        if "error" in chunk:
            result.error = str(chunk["error"].get("message", chunk["error"]))
            break
        if chunk.get("usage"):
            result.output_tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if not text:
                continue
            now = clock()
            if last is None:
                result.ttft_s = now - sent
            else:
                result.itl_s.append(now - last)
            last = now
            result.text += text
    return result
