"""Several data sets in one run (`--data a,b`): name parsing, one label set, per-source splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.data import ClassificationExample, Dataset, data_names, load_dataset, split_dataset
from training.errors import DatasetError


def _csv(tmp_path: Path, name: str, rows: list[tuple[str, str]]) -> Path:
    path = tmp_path / name
    path.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return path


@pytest.mark.parametrize("spec, names", [
    ("rotten-tomatoes", ["rotten-tomatoes"]),
    ("rotten-tomatoes,debates", ["rotten-tomatoes", "debates"]),
    ("chatterbot:ai,coding", ["chatterbot:ai,coding"]),
    ("chatterbot:ai,coding,rotten-tomatoes", ["chatterbot:ai,coding", "rotten-tomatoes"]),
    ("chatterbot:ai, chatterbot:trivia", ["chatterbot:ai", "chatterbot:trivia"]),
])
def test_data_names(spec: str, names: list[str]) -> None:
    assert data_names(spec) == names


def test_a_path_with_a_comma_stays_one_name(tmp_path: Path) -> None:
    path = _csv(tmp_path, "a,b.csv", [("x", "p"), ("y", "q")])
    assert data_names(str(path)) == [str(path)]


def test_labels_are_the_union_and_parts_follow_it(tmp_path: Path) -> None:
    first = _csv(tmp_path, "one.csv", [("good", "pos"), ("bad", "neg")])
    second = _csv(tmp_path, "two.csv", [("meh", "neutral"), ("great", "pos"), ("awful", "neg")])
    data = load_dataset(f"{first},{second}", "classification")
    assert data.labels == ("neg", "pos", "neutral") and [p.name for p in data.parts] == ["one.csv", "two.csv"]
    named = [(e.text, data.labels[e.label]) for e in data.examples]
    assert named == [("good", "pos"), ("bad", "neg"), ("meh", "neutral"), ("great", "pos"), ("awful", "neg")]
    assert all(part.labels == data.labels for part in data.parts)


def test_each_part_holds_out_what_it_would_alone(tmp_path: Path) -> None:
    first = _csv(tmp_path, "one.csv", [(f"a{i}", "pos" if i % 2 else "neg") for i in range(20)])
    second = _csv(tmp_path, "two.csv", [(f"b{i}", "x" if i % 3 else "y") for i in range(30)])
    both = split_dataset(load_dataset(f"{first},{second}", "classification"), 0.2, 5, 100)
    alone = [split_dataset(load_dataset(str(p), "classification"), 0.2, 5, 100) for p in (first, second)]
    texts = lambda d: [e.text for e in d.examples]  # noqa: E731
    assert [texts(p) for p in both.validation_parts] == [texts(s.validation) for s in alone]
    assert texts(both.validation) == sum((texts(s.validation) for s in alone), [])
    assert sorted(texts(both.train)) == sorted(sum((texts(s.train) for s in alone), []))
    assert both.train.labels == both.validation.labels == ("neg", "pos", "x", "y")


def test_mixed_tasks_and_repeats_are_refused(tmp_path: Path) -> None:
    sentiment = _csv(tmp_path, "s.csv", [("good", "pos"), ("bad", "neg")])
    with pytest.raises(DatasetError, match="is for completion, but the task is classification"):
        load_dataset(f"{sentiment},chatterbot:trivia", "classification")
    with pytest.raises(DatasetError, match="named twice"):
        load_dataset(f"{sentiment},{sentiment}", "classification")
    with pytest.raises(DatasetError, match="empty name"):
        load_dataset("rotten-tomatoes,,debates", "classification")


def test_a_malformed_part_names_its_file_and_line(tmp_path: Path) -> None:
    good = _csv(tmp_path, "good.csv", [("good", "pos"), ("bad", "neg")])
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,pos\nbroken\n")
    with pytest.raises(DatasetError, match=f"{bad}:3: expected 2 fields"):
        load_dataset(f"{good},{bad}", "classification")


def test_pretrain_mixes_bundled_and_text_files(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("alpha\n\nbeta\n")
    data = load_dataset(f"chatterbot:trivia,{notes}", "pretrain")
    assert data.task == "pretrain" and [p.name for p in data.parts][1] == "notes.txt"
    assert len(data) == len(data.parts[0]) + 2


def test_a_single_set_has_no_parts() -> None:
    data = Dataset("d", "classification", (ClassificationExample("a", 0), ClassificationExample("b", 1)), ("x", "y"))
    assert split_dataset(data, 0.5, 0, 10).validation_parts == ()
