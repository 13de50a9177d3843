"""Incremental detokenization against the reference, tokenizer.decode(tokens, skip_special_tokens=True) of
the whole sequence at every step: with SmolLM2's real tokenizer (ByteLevel, clean-up on) and with small
SentencePiece-style tokenizers built here (Metaspace / Strip first-token handling, byte fallback), on text
round trips (emoji, CJK, clean-up patterns) and random ids (special tokens, partial UTF-8, unknown ids).
Then DecodeState's streamed text and stop strings against a plain specification."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from server.engine.decode_state import DecodeState
from server.engine.detokenize import (
    CLEANUP_PATTERNS, FullDecodeDetokenizer, IncrementalDetokenizer, _cleanup_cut, make_detokenizer,
)
from server.engine.sampling import SamplingParams

TEXTS = [
    "Hello , world . I do n't know ! Is it ? Yes , it 's fine ' quoted ' they 're we 've I 'm",
    "你好，世界！日本語のテキスト。한국어 텍스트.",
    "emoji 🎉🎉 family 👩‍👩‍👧 flags 🇫🇷🇯🇵 and ünïcödé ∑∫√ — “quotes”",
    "def f(x):\n    return x ?\n\n\tindented  two  spaces . end  ",
    "a ' ' b  ' s n 't  ,  . ? ! x",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_base):
    return AutoTokenizer.from_pretrained(smollm2_base.path)


def sentencepiece_tokenizer(decoder: str, cleanup: bool) -> PreTrainedTokenizerFast:
    """A small SentencePiece-style tokenizer: ▁ words, 256 byte-fallback tokens, specials; the decoder
    strips the first token's leading space (Llama 2's Replace/ByteFallback/Fuse/Strip, or Metaspace)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for word in ["▁Hello", "▁world", "▁", ".", "'", "t", "n", "▁n", "s", "▁'", ",", "?", "!", "▁the", "ing",
                 "▁a", "a", "re", "ve", "m", "▁.", "▁,", "▁?", "'t", "▁▁", "你", "▁好"]:
        vocab[word] = len(vocab)
    merges = [("▁", "a"), ("▁", "n"), ("▁", "."), ("'", "t")]
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    if decoder == "strip":
        model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    else:
        model.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                      prepend_scheme="always")])
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=cleanup)


SENTENCEPIECE = [("strip", True), ("strip", False), ("metaspace", True), ("metaspace", False)]


def assert_equals_reference(tokenizer, ids: list[int], detokenizer=None) -> None:
    """At every step: the stable text so far plus the pending text == the whole-sequence decode; while that
    ends in a partial character (U+FFFD), pending does too (byte fallback may blank earlier bytes then)."""
    detokenizer = detokenizer or IncrementalDetokenizer(tokenizer)
    byte_fallback = "<0x00>" in tokenizer.get_vocab()
    stable = ""
    for step, token in enumerate(ids):
        piece, pending = detokenizer.push(token)
        stable += piece
        expected = tokenizer.decode(ids[: step + 1], skip_special_tokens=True)
        if expected.endswith("\ufffd") and byte_fallback:
            assert pending.endswith("\ufffd"), (step, ids[: step + 1])
        else:
            assert stable + pending == expected, (step, ids[: step + 1])


def random_ids(rng: random.Random, vocab: int, length: int, specials: int) -> list[int]:
    """Mostly ordinary ids, some special ones, a few past the vocabulary (a padded head's)."""
    out = []
    for _ in range(length):
        draw = rng.random()
        out.append(rng.randrange(specials) if draw < 0.1 else vocab + rng.randrange(64) if draw < 0.13
                   else rng.randrange(vocab))
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_text_round_trips(smollm2_tokenizer, text):
    ids = smollm2_tokenizer(text)["input_ids"]
    assert_equals_reference(smollm2_tokenizer, ids)
    specials = [smollm2_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<file_sep>")]
    assert_equals_reference(smollm2_tokenizer, [specials[0], *ids[:5], *specials, *ids[5:], specials[1]])


def test_smollm2_random_ids(smollm2_tokenizer):
    rng = random.Random(0)
    vocab = len(smollm2_tokenizer)
    for _ in range(150):
        assert_equals_reference(smollm2_tokenizer, random_ids(rng, vocab, 40, specials=17))


def test_smollm2_byte_tokens_split_characters(smollm2_tokenizer):
    """Characters whose UTF-8 bytes come as separate tokens: pending (U+FFFD) until the last byte."""
    text = "🎉你好👩‍👩‍👧"
    ids = [smollm2_tokenizer.convert_tokens_to_ids(smollm2_tokenizer.convert_ids_to_tokens(i))
           for i in smollm2_tokenizer(text)["input_ids"]]
    assert len(ids) > len("🎉你好")  # some characters take several tokens
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer)
    pieces = [detokenizer.push(token) for token in ids]
    assert "".join(stable for stable, _ in pieces) == text
    assert any(pending.endswith("\ufffd") for _, pending in pieces)


@pytest.mark.parametrize("decoder, cleanup", SENTENCEPIECE)
def test_sentencepiece_style_text_and_random_ids(decoder, cleanup):
    tokenizer = sentencepiece_tokenizer(decoder, cleanup)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert_equals_reference(tokenizer, ids)
        assert_equals_reference(tokenizer, [1, 1, *ids[:3], 2, *ids[3:]])  # specials first: the Strip case
    rng = random.Random(1)
    words = [i for t, i in tokenizer.get_vocab().items() if not t.startswith("<")]
    chars = "aé你好🎉€ß\n"
    for _ in range(150):
        ids = []
        for _ in range(20):  # words, specials, unknown ids, and characters as complete runs of byte tokens
            draw = rng.random()
            if draw < 0.3:
                ids += tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in rng.choice(chars).encode()])
            else:
                ids.append(rng.randrange(3) if draw < 0.4 else len(tokenizer) + 7 if draw < 0.45 else rng.choice(words))
        assert_equals_reference(tokenizer, ids)


def test_cleanup_in_chunks_equals_cleanup_of_the_whole():
    """The cut rule for transformers' clean-up, on random text over the patterns' alphabet cut at random
    arrival points: cleaned chunks + the cleaned held tail == clean-up of everything so far."""
    clean = PreTrainedTokenizerBase.clean_up_tokenization
    alphabet = [" ", " ", ".", "'", "n", "t", "s", "m", "v", "e", "r", ",", "?", "!", "a", "x"]
    rng = random.Random(2)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 24)))
        out, held, at = "", "", 0
        while at < len(text):
            step = rng.randrange(1, 4)
            chunk, at = text[at : at + step], at + step
            joined = held + chunk
            cut = _cleanup_cut(joined)
            out, held = out + clean(joined[:cut]), joined[cut:]
            assert out + clean(held) == clean(text[:at]), (text, at)
    assert all(clean(p) != p for p in CLEANUP_PATTERNS)  # the patterns are transformers' own


def test_the_reference_is_chosen_where_the_fast_path_does_not_apply(smollm2_tokenizer):
    assert isinstance(make_detokenizer(smollm2_tokenizer), IncrementalDetokenizer)

    class CustomCleanup(PreTrainedTokenizerFast):
        @staticmethod
        def clean_up_tokenization(out_string: str) -> str:
            return out_string.replace(" ;", ";")

    custom = CustomCleanup(tokenizer_object=sentencepiece_tokenizer("strip", True).backend_tokenizer,
                           clean_up_tokenization_spaces=True)
    assert isinstance(make_detokenizer(custom), FullDecodeDetokenizer)
    assert_equals_reference(smollm2_tokenizer, smollm2_tokenizer(TEXTS[2])["input_ids"],
                            FullDecodeDetokenizer(smollm2_tokenizer))


# -- DecodeState: streamed text and stop strings ---------------------------------------------------------

def expected_output(tokenizer, ids: list[int], stops: tuple[str, ...], max_tokens: int) -> tuple[str, str, int]:
    """The specification: -> (text, finish reason, tokens used). The first prefix of the tokens whose
    decode holds a stop string ends the text where that stop begins; else max_tokens ends it."""
    for n in range(1, max_tokens + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        found = [i for s in stops if (i := text.find(s)) >= 0]
        if found:
            return text[: min(found)], "stop", n
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True), "length", max_tokens


def run_state(tokenizer, ids: list[int], stops: tuple[str, ...], max_tokens: int):
    state = DecodeState(SamplingParams(max_tokens=max_tokens, stop=stops, ignore_eos=True), tokenizer, set(), None)
    deltas = []
    for token in ids:
        deltas.append(state.accept(token))
        if state.finished:
            break
    return deltas


@pytest.mark.parametrize("seed", range(4))
def test_stop_strings_and_streaming_follow_the_specification(smollm2_tokenizer, seed):
    rng = random.Random(seed)
    tokenizer = smollm2_tokenizer
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        for _ in range(10):
            start = rng.randrange(len(full))
            stops = (full[start : start + rng.randrange(1, 5)],)
            if rng.random() < 0.3:
                stops += ("never there",)
            if rng.random() < 0.3:
                stops = ()
            deltas = run_state(tokenizer, ids, stops, len(ids))
            text_out, reason, used = expected_output(tokenizer, ids, stops, len(ids))
            assert "".join(d.text for d in deltas) == text_out, (text, stops)
            assert deltas[-1].finish_reason == reason and len(deltas) == used
            assert all(d.finish_reason is None for d in deltas[:-1])
            streamed = ""
            for delta in deltas[:-1]:  # never a partial character, never a stop's text, as it streams
                streamed += delta.text
                assert not streamed.endswith("\ufffd")
                assert not any(s in streamed for s in stops)


def test_a_stop_string_across_tokens_is_held_back_then_cut(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    ids = tokenizer("The answer is 42. Done")["input_ids"]
    deltas = run_state(tokenizer, ids, ("42.",), 20)
    assert "".join(d.text for d in deltas) == "The answer is "
    assert deltas[-1].finish_reason == "stop"
    # tokens " ", "4", "2": the space waits for the clean-up to see what follows, "4" and "2" could begin the stop
    assert [d.text for d in deltas[-4:-1]] == ["", " ", ""]


def test_a_partial_character_finishes_as_decoded_at_length(smollm2_tokenizer):
    """max_tokens inside a character: the decode (with U+FFFD) is sent, as a whole-sequence decode gives."""
    tokenizer = smollm2_tokenizer
    ids = tokenizer("ok 👩‍👩‍👧")["input_ids"]
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    deltas = run_state(tokenizer, ids, (), cut)
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids[:cut])
    assert deltas[-1].finish_reason == "length"


def test_an_invalid_byte_run_goes_on_from_the_reported_text():
    """Byte fallback: a run of byte tokens that never becomes valid UTF-8 turns characters already reported
    into U+FFFD. The detokenizer then decodes whole sequences, from what it reported, as DecodeState did."""
    tokenizer = sentencepiece_tokenizer("strip", False)
    ids = [*tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in "你".encode()]),
           tokenizer.convert_tokens_to_ids("<0x80>"), tokenizer.convert_tokens_to_ids("▁world")]
    fast, slow = IncrementalDetokenizer(tokenizer), FullDecodeDetokenizer(tokenizer)
    for token in ids:
        (fast_stable, fast_pending), (slow_stable, slow_pending) = fast.push(token), slow.push(token)
        assert fast_stable == slow_stable
        assert fast_pending == slow_pending or fast_pending[-1:] == slow_pending[-1:] == "\ufffd"
    assert fast.fallback is not None and fast_stable.endswith(" world")
