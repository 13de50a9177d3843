"""User CSV / JSONL files: both tasks, and every malformed input named by file, line and reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from training.data import load_dataset
from training.errors import DatasetError


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_csv_classification_with_quoted_multiline_text(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.csv", 'text,label\n"good, really",pos\n"two\nlines",neg\nfine,pos\n')
    data = load_dataset(str(path), "classification")
    assert data.labels == ("neg", "pos")
    assert [(e.text, data.labels[e.label]) for e in data.examples] == [
        ("good, really", "pos"), ("two\nlines", "neg"), ("fine", "pos")]


def test_jsonl_completion_raw_and_chat_rows(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+2=", "completion": " 4"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
    ]
    path = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    raw, chat = load_dataset(str(path), "completion").examples
    assert (raw.prompt, raw.answer, raw.messages) == ("2+2=", " 4", ())
    assert chat.answer == "Hello!" and [t.role for t in chat.messages] == ["system", "user"]


def test_csv_completion_rows(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.csv", "prompt,completion\nQ: sky?,blue\n")
    (row,) = load_dataset(str(path), "completion").examples
    assert (row.prompt, row.answer) == ("Q: sky?", "blue")


@pytest.mark.parametrize("name, content, task, where, reason", [
    ("d.csv", "text,label\ngood,pos\nbad,neg,extra\n", "classification", ":3:", "expected 2 fields"),
    ("d.csv", 'text,label\ngood,pos\n"a\nb",pos\nbad\n', "classification", ":5:", "found 1"),
    ("d.csv", "text,label\ngood,pos\n,neg\n", "classification", ":3:", "'text' is empty"),
    ("d.csv", "text,category\ngood,pos\n", "classification", ":2:", "missing 'label'"),
    ("d.csv", 'text,label\ngood,pos\n"unclosed,neg\n', "classification", ":3:", "malformed CSV"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c",\n', "classification",
     ":3:", "invalid JSON"),
    ("d.jsonl", '["text", "label"]\n', "classification", ":1:", "must be a JSON object"),
    ("d.jsonl", '{"prompt": "p"}\n', "completion", ":1:", "missing 'completion'"),
    ("d.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}\n',
     "completion", ":1:", "last of 'messages' must be a non-empty assistant turn"),
    ("d.jsonl", '{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
     "completion", ":1:", r"messages\[0\] must be"),
    ("d.csv", b"text,label\ngood,pos\nbad \xff,neg\n", "classification", ":3:", "not UTF-8"),
])
def test_malformed_rows_name_file_line_and_reason(
    tmp_path: Path, name: str, content: str | bytes, task: str, where: str, reason: str
) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(DatasetError) as caught:
        load_dataset(str(path), task)
    message = str(caught.value)
    assert message.startswith(f"{path}{where}"), message
    assert re.search(reason, message), message


@pytest.mark.parametrize("name, content, reason", [
    ("empty.csv", "", "empty file"),
    ("header.csv", "text,label\n", "no data rows"),
    ("blank.jsonl", "\n\n", "no data rows"),
    ("one.csv", "text,label\na,x\nb,x\n", "at least 2 labels"),
    ("d.txt", "text,label\n", "unsupported file type"),
])
def test_empty_or_unusable_files(tmp_path: Path, name: str, content: str, reason: str) -> None:
    with pytest.raises(DatasetError, match=reason):
        load_dataset(str(_write(tmp_path, name, content)), "classification")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="neither a bundled data set"):
        load_dataset(str(tmp_path / "nope.csv"), "classification")


# -- raw text for continued pre-training --------------------------------------------------------------------

def test_txt_paragraphs_are_documents(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.txt", "First paragraph,\nwrapped.\n\n\nSecond one.\r\n\r\nThird.\n")
    data = load_dataset(str(path), "pretrain")
    assert data.task == "pretrain" and [e.text for e in data.examples] == [
        "First paragraph,\nwrapped.", "Second one.", "Third."]


def test_txt_of_one_paragraph_gives_one_document_per_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.txt", "line one\nline two\n   \nline three")
    assert [e.text for e in load_dataset(str(path), "pretrain").examples] == ["line one", "line two", "line three"]


def test_pretrain_from_text_columns_with_line_numbers(tmp_path: Path) -> None:
    good = _write(tmp_path, "d.jsonl", '{"text": "a document"}\n{"text": "another"}\n')
    assert [e.text for e in load_dataset(str(good), "pretrain").examples] == ["a document", "another"]
    bad = _write(tmp_path, "bad.jsonl", '{"text": "fine"}\n\n{"text": " "}\n')
    with pytest.raises(DatasetError, match=re.escape(f"{bad}:3: 'text' is empty")):
        load_dataset(str(bad), "pretrain")


@pytest.mark.parametrize("content", ["", "\n \n\n"])
def test_blank_txt_is_a_clear_error(tmp_path: Path, content: str) -> None:
    with pytest.raises(DatasetError, match="no text"):
        load_dataset(str(_write(tmp_path, "d.txt", content)), "pretrain")


def test_bundled_sets_serve_as_raw_text() -> None:
    trivia = load_dataset("chatterbot:trivia", "pretrain")
    assert trivia.task == "pretrain" and "\n" in trivia.examples[0].text  # question, line break, answer
