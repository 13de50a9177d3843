"""What a load run sends, decided before Locust starts and handed to it as one JSON file (the plan).

loadtest/serve.py builds the plan (it may import torch: it samples real data and tokenizes it); the
Locust process only reads it (it must not import torch, see loadtest/locustfile.py). Everything here is
plain Python so that both sides, and the tests, can use it.

- Adapter popularity is a seeded zipf (S-LoRA's and Punica's traces): the rank-i name of a seeded
  shuffle is chosen with probability proportional to 1 / i**exponent.
- Prompts and output lengths are real: chatterbot-corpus questions, each with the token count of its
  corpus answer as the completion length (clipped), sent with `ignore_eos` so the lengths hold.
- The admin schedule: add the swap name, replace it `swaps` times (each time with another folder), with a
  remove and a fresh add after every third replace, and a final remove; the ops are spread evenly over
  the run.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

REPLACES_PER_REMOVE = 3


@dataclass(frozen=True)
class Sample:
    prompt: str  # a real question
    output_tokens: int  # its real answer's length in the base's tokens, clipped to the run's bounds


@dataclass(frozen=True)
class Plan:
    completion_host: str  # the decoder server (smollm2-135m with the adapters)
    classify_host: str  # the encoder server (minilm-l6 with the classifiers)
    base: str  # the decoder's own model id (no adapter)
    adapters: tuple[str, ...]  # completion adapters the traffic spreads over, in zipf rank order
    classifiers: tuple[str, ...]
    samples: tuple[Sample, ...]
    classify_texts: tuple[str, ...]
    swap_name: str  # the one name the admin user adds, replaces and removes
    swap_folders: dict[str, str]  # folder label -> path (as the server sees it)
    expected: dict[str, str]  # folder label -> greedy answer to the probe
    probe_prompt: str
    probe_tokens: int
    admin_ops: tuple[str, ...]  # "add" | "replace" | "remove", in order
    run_time_s: float
    records_path: str  # JSON lines, one per request (loadtest/timing.py)
    versions_path: str  # the admin ops and the version verdicts (written at the end)
    seed: int = 0
    zipf_exponent: float = 1.1
    temperature: float = 0.7
    classify_batch: int = 4

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        raw = json.loads(Path(path).read_text())
        raw["samples"] = tuple(Sample(**s) for s in raw["samples"])
        for key in ("adapters", "classifiers", "classify_texts", "admin_ops"):
            raw[key] = tuple(raw[key])
        return cls(**raw)


class ZipfChooser:
    """choose() returns names[i] with probability proportional to 1 / (rank(i) ** exponent), the ranks a
    seeded shuffle of `names`; each caller passes its own seeded random.Random."""

    def __init__(self, names: tuple[str, ...], exponent: float, seed: int) -> None:
        if not names:
            raise ValueError("zipf over no names")
        self.ranked = list(names)
        random.Random(seed).shuffle(self.ranked)
        weights = [1.0 / (rank ** exponent) for rank in range(1, len(self.ranked) + 1)]
        self.cumulative = list(itertools.accumulate(weights))

    def choose(self, rng: random.Random) -> str:
        point = rng.random() * self.cumulative[-1]
        return self.ranked[min(bisect.bisect_right(self.cumulative, point), len(self.ranked) - 1)]

    def probabilities(self) -> dict[str, float]:
        total, previous, out = self.cumulative[-1], 0.0, {}
        for name, upto in zip(self.ranked, self.cumulative):
            out[name], previous = (upto - previous) / total, upto
        return out


def admin_schedule(swaps: int) -> tuple[str, ...]:
    """add, `swaps` replaces (a remove and an add after every third, but the last), then a remove."""
    ops = ["add"]
    for i in range(1, swaps + 1):
        ops.append("replace")
        if i % REPLACES_PER_REMOVE == 0 and i < swaps:
            ops += ["remove", "add"]
    return (*ops, "remove")


def op_times(ops: tuple[str, ...], run_time_s: float) -> list[float]:
    """Seconds after the admin user starts at which each op is sent: evenly spaced, the last one well
    before the end so that probes see the final state too."""
    gap = run_time_s / (len(ops) + 1)
    return [gap * (i + 1) for i in range(len(ops))]


def clip_length(tokens: int, low: int, high: int) -> int:
    return max(low, min(high, tokens))
