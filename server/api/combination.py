"""A request's `model` naming a weighted combination of adapters: `"a:0.7+b:0.3"`.

Grammar: parts joined by '+', each `NAME` or `NAME:WEIGHT` (weight 1 when omitted); WEIGHT a plain decimal,
optionally negative, optionally with an exponent without a sign after the 'e' ("1e-3" reads, "1e+3" does not:
'+' joins parts). Adapter names never hold ':' or '+' (adapters.names), so a name is never mistaken for a
combination; the base's own name is matched before any of this.

A combination row's delta is sum_i w_i * scaling_i * B_i A_i: PEFT's `cat` merge of the same parents
(`training merge --method cat`), served from the parents' own slots, not PEFT's `linear` merge (which mixes
the A and B factors and is not a sum of deltas).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from adapters import AdapterNameError, validate_adapter_name
from server.api.errors import ApiError

MAX_PARTS = 8  # parents of one combination; each takes a LoRA slot in every batch the request runs in
PART_SEPARATOR = "+"
WEIGHT_SEPARATOR = ":"
COMBINATION_LABEL = "__combination__"  # the metrics label of every combination request (bounded cardinality)
_WEIGHT_RE = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE]-?\d+)?")


@dataclass(frozen=True)
class CombinationRef:
    """A parsed combination: (adapter name, weight) per part, in the request's order."""

    parts: tuple[tuple[str, float], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)


def is_combination(model: str) -> bool:
    """Whether `model` is written as a combination (adapter names hold neither separator)."""
    return PART_SEPARATOR in model or WEIGHT_SEPARATOR in model


def parse_combination(model: str, max_parts: int = MAX_PARTS) -> CombinationRef:
    """The parts of `model`, or ApiError 400 (param `model`) saying what is wrong with it."""
    texts = model.split(PART_SEPARATOR)
    if len(texts) > max_parts:
        raise _bad(model, f"it combines {len(texts)} adapters; at most {max_parts} are served in one combination")
    parts: list[tuple[str, float]] = []
    for text in texts:
        name, sep, weight_text = text.strip().partition(WEIGHT_SEPARATOR)
        if not name:
            raise _bad(model, "every part needs an adapter name (NAME or NAME:WEIGHT, joined by '+')")
        try:
            validate_adapter_name(name)
        except AdapterNameError as exc:
            raise _bad(model, str(exc)) from exc
        weight = 1.0
        if sep:
            if not _WEIGHT_RE.fullmatch(weight_text):
                raise _bad(model, f"the weight of {name!r} must be a decimal number, got {weight_text!r}")
            weight = float(weight_text)
            if not math.isfinite(weight):
                raise _bad(model, f"the weight of {name!r} must be finite, got {weight_text!r}")
        parts.append((name, weight))
    names = [name for name, _ in parts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _bad(model, f"it names {duplicates} more than once; give each adapter once, with one weight")
    return CombinationRef(tuple(parts))


def _bad(model: str, why: str) -> ApiError:
    return ApiError(400, f"model {model!r} is not a valid adapter combination: {why}", param="model")
