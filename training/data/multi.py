"""Several data sets in one run (`--data a,b`): names parsed from one string, rows combined under one label set.

Rows are not interleaved here: the combined set is the concatenation of its parts, and the training loop's
seeded shuffle interleaves them (each epoch draws from every part in proportion to its size). Each part
keeps its own train/validation split (training.data.split), so a part's held-out rows are the same as in a
run on that part alone, and the held-out figures are reported per part as well as overall.
"""

from __future__ import annotations

from pathlib import Path

from training.data.bundled import CHATTERBOT_PREFIX, is_bundled_name
from training.data.examples import ClassificationExample, CompletionExample, Dataset, TextExample
from training.errors import DatasetError

SEPARATOR = ","
ANSWER_JOINER = "\n"  # a completion row as raw text: its prompt, a line break, its answer


def data_names(spec: str) -> list[str]:
    """`a,b` -> [a, b]. Commas stay inside an existing file's path and inside a chatterbot topic list:
    `chatterbot:ai,coding,rotten-tomatoes` -> [chatterbot:ai,coding, rotten-tomatoes]."""
    if Path(spec).expanduser().exists() or SEPARATOR not in spec:
        return [spec.strip()]
    names: list[str] = []
    for piece in (p.strip() for p in spec.split(SEPARATOR)):
        if not piece:
            raise DatasetError(f"data {spec!r} has an empty name between commas")
        continues_topics = (names and names[-1].startswith(CHATTERBOT_PREFIX + ":") and not is_bundled_name(piece)
                            and not Path(piece).expanduser().exists())
        if continues_topics:
            names[-1] += SEPARATOR + piece
        else:
            names.append(piece)
    return names


def relabel(dataset: Dataset, labels: tuple[str, ...]) -> Dataset:
    """The same rows with label indices into `labels` (e.g. an adapter's order); unknown label names are an error."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({dataset.labels[e.label] for e in dataset.examples if dataset.labels[e.label] not in index})
    if unknown:
        raise DatasetError(f"{dataset.name}: labels {unknown} are not among the adapter's labels {list(labels)}")
    examples = tuple(ClassificationExample(e.text, index[dataset.labels[e.label]]) for e in dataset.examples)
    parts = tuple(relabel(part, labels) for part in dataset.parts)
    return Dataset(dataset.name, dataset.task, examples, labels, parts)


def combine(datasets: list[Dataset]) -> Dataset:
    """One Dataset holding every part; classification labels are the union in first-seen order (a label
    name shared by two sets is one class)."""
    names = [d.name for d in datasets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DatasetError(f"data set {repeated[0]!r} is named twice in --data")
    tasks = {d.task for d in datasets}
    if len(tasks) > 1:
        raise DatasetError(f"one run trains one task; --data mixes {', '.join(sorted(tasks))}")
    labels: list[str] = []
    for dataset in datasets:
        labels += [label for label in dataset.labels if label not in labels]
    parts = tuple(relabel(d, tuple(labels)) if labels else d for d in datasets)
    examples = tuple(e for part in parts for e in part.examples)
    return Dataset(SEPARATOR.join(names), datasets[0].task, examples, tuple(labels), parts)


def as_raw_text(dataset: Dataset) -> Dataset:
    """Any bundled set as documents for continued pre-training: review / tweet texts, or question + answer."""
    documents = []
    for example in dataset.examples:
        if isinstance(example, CompletionExample):
            documents.append(TextExample(example.prompt + ANSWER_JOINER + example.answer))
        elif isinstance(example, (ClassificationExample, TextExample)):
            documents.append(TextExample(example.text))
    return Dataset(dataset.name, "pretrain", tuple(documents))
