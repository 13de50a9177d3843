"""Incremental detokenization: the text each new token adds, in O(1) amortized per token, equal to decoding
the whole sequence again.

    detok = make_detokenizer(tokenizer)          # one per sequence
    stable, pending = detok.push(token)          # every generated token (EOS included when it is not a stop)

`stable` is text that no later token can change; `pending` is the rest of the decode after all the stable
text so far, which a later token may still change (a character whose UTF-8 bytes are not all in, a space
the tokenizer's clean-up may still delete). At every step whose decode does not end in U+FFFD

    "".join(every stable so far) + pending == tokenizer.decode(tokens, skip_special_tokens=True)

and while it does, `pending` ends in U+FFFD too. (The exception is byte-fallback decoders (Llama 2, Mistral):
while a run of <0x..> byte tokens is not valid UTF-8 they decode the whole run, characters completed
earlier included, as U+FFFD; a whole-sequence decode's text is then not an extension of the previous
step's. A run that stays invalid rewrites text already streamed; this module, like DecodeState before it,
then goes on from the text already reported.)

`FullDecodeDetokenizer` is the slow reference (the whole sequence decoded at every token, O(n) per token,
what DecodeState did before); `IncrementalDetokenizer` is the fast path, used for fast (Rust) tokenizers:

1. Tokens the decode skips (special added tokens, ids the tokenizer does not have) are dropped on arrival,
   so the decoder sees exactly the tokens a whole-sequence decode would.
2. vLLM's prefix/read offsets: decode a window of the last few kept tokens, `ids[prefix:]`, with the
   Rust tokenizer (no clean-up), and take what it adds past `decode(ids[prefix:read])`. The window starts one
   committed step back so that decoders which treat the first token differently (SentencePiece's leading
   space, a `Strip` decoder) see the same first token as in the whole sequence, and byte-level decoders
   start on a character boundary. While the window's text ends in U+FFFD (a partial character) nothing is
   committed and the window grows; otherwise the new text is committed and the window slides forward.
3. transformers' `clean_up_tokenization` (" ." -> ".", " n't" -> "n't", ...; on for SmolLM2) is not local to
   a token: a space decoded now may be deleted by the next token. The raw text is cleaned in chunks cut
   where no clean-up pattern can span the cut (the text before the cut does not end with a proper prefix
   of a pattern, all of which start with a space); the raw tail after the last such cut is held back.

Why not tokenizers' `DecodeStream` (tokenizers >= 0.21): it does 2 (with skip_special_tokens) but not 3,
so on SmolLM2 it differs from `tokenizer.decode` at every " ." / " ," / " n't"
(tests/server/test_detokenize.py measures both).
"""

from __future__ import annotations

import logging
from typing import Protocol

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 sequence decodes to; wait for the next token
# what transformers' PreTrainedTokenizerBase.clean_up_tokenization replaces, in its order (each loses its space)
CLEANUP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
_CLEANUP_PREFIXES = frozenset(p[:k] for p in CLEANUP_PATTERNS for k in range(1, len(p)))  # " ", " '", " n", ...
_LONGEST_PREFIX = max(len(p) for p in _CLEANUP_PREFIXES)


class Detokenizer(Protocol):
    def push(self, token: int) -> tuple[str, str]:
        """-> (stable, pending): text that is final now, and the decode's rest after all stable text."""
        ...


def make_detokenizer(tokenizer: PreTrainedTokenizerBase) -> Detokenizer:
    """The incremental detokenizer where it is exact (a fast tokenizer whose clean-up, if on, is
    transformers' own), else the whole-sequence reference."""
    custom_cleanup = type(tokenizer).clean_up_tokenization is not PreTrainedTokenizerBase.clean_up_tokenization
    if getattr(tokenizer, "is_fast", False) and not (tokenizer.clean_up_tokenization_spaces and custom_cleanup):
        return IncrementalDetokenizer(tokenizer)
    return FullDecodeDetokenizer(tokenizer)


class FullDecodeDetokenizer:
    """The reference: every token decodes the whole sequence again (O(n) per token). Text is stable once
    the decode does not end in a partial character; a decode that rewrites earlier text (a clean-up) is
    reported from where the stable text ended, as before."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.stable_len = 0

    def push(self, token: int) -> tuple[str, str]:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith(REPLACEMENT_CHAR):
            return "", text[self.stable_len:]
        stable, self.stable_len = text[self.stable_len:], max(self.stable_len, len(text))
        return stable, ""


class IncrementalDetokenizer:
    """The fast path (see the module docstring). Amortized O(1) per token: each decode covers the tokens
    since the previous commit plus the committed step before them."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer: decode without transformers' clean-up
        self.special = frozenset(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        self.cleanup = tokenizer.clean_up_tokenization if tokenizer.clean_up_tokenization_spaces else None
        self.ids: list[int] = []  # the kept tokens (what a skip_special_tokens decode reads)
        self.prefix_offset = 0  # the window starts here: the tokens of the last commit
        self.read_offset = 0  # the tokens before this are committed
        self.prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self.raw_pending = ""  # the window's text past prefix_text while it is not committed
        self.held_raw = ""  # committed raw text held back from clean-up: it may begin a pattern
        self.stable_len = 0  # characters reported stable so far
        self.fallback: FullDecodeDetokenizer | None = None  # after a decode that broke the window's premise

    def push(self, token: int) -> tuple[str, str]:
        if self.fallback is not None:
            return self.fallback.push(token)
        stable, pending = self._push(token)
        self.stable_len += len(stable)
        return stable, pending

    def _push(self, token: int) -> tuple[str, str]:
        if token in self.special or self.backend.id_to_token(token) is None:
            return self._clean("", self.raw_pending)  # adds nothing; what is pending stays so
        self.ids.append(token)
        window = self.backend.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        raw = window[len(self.prefix_text):] if window.startswith(self.prefix_text) else None
        if window.endswith(REPLACEMENT_CHAR) or raw == "":  # a partial character (or no text yet): wait
            # byte-fallback decoders show a whole run of byte tokens as U+FFFD while it is not valid UTF-8,
            # bytes of the window's prefix included: then only the part that agrees is taken as pending
            if raw is None:
                raw = window[len(_common_prefix(window, self.prefix_text)):] or REPLACEMENT_CHAR
            self.raw_pending = raw
            return self._clean("", self.raw_pending)
        if raw is None:  # the decode rewrote committed text: not seen with ByteLevel / SentencePiece decoders
            return self._fall_back(token)
        self.raw_pending = ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.prefix_text = self.backend.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        return self._clean(raw, "")

    def _clean(self, raw: str, raw_pending: str) -> tuple[str, str]:
        """Committed raw text and the raw pending rest -> the same after clean-up (when the tokenizer does it)."""
        if self.cleanup is None:
            return raw, raw_pending
        text = self.held_raw + raw
        cut = _cleanup_cut(text)
        stable, self.held_raw = text[:cut], text[cut:]
        return self.cleanup(stable), self.cleanup(self.held_raw + raw_pending)

    def _fall_back(self, token: int) -> tuple[str, str]:
        """Decode the rest of this sequence the slow way, from the text already reported stable."""
        log.warning("incremental detokenization does not fit %s; decoding whole sequences for this one",
                    type(self.tokenizer).__name__)
        self.fallback = FullDecodeDetokenizer(self.tokenizer)
        self.fallback.tokens, self.fallback.stable_len = self.ids[:-1], self.stable_len
        return self.fallback.push(token)


def _cleanup_cut(text: str) -> int:
    """The last position no clean-up pattern can span: `text[:cut]` ends in no proper prefix of a pattern.
    `text` starts at such a position, so 0 always qualifies."""
    for cut in range(len(text), 0, -1):
        if not any(text[max(0, cut - k):cut] in _CLEANUP_PREFIXES for k in range(1, _LONGEST_PREFIX + 1)):
            return cut
    return 0


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
