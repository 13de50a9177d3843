"""User data files: CSV (with a header) or JSONL for every task, plain text (.txt) for pretrain.

Row shapes:
- classification: `text,label` (CSV columns or JSON keys). Labels are strings; their order is sorted.
- completion: `prompt,completion` (raw text, no chat template) or, in JSONL only, `messages`: a list of
  `{role, content}` turns ending with the assistant's answer (rendered with the chat template).
- pretrain: a `text` column / key per document, or a .txt file whose documents are its paragraphs
  (separated by blank lines); a .txt file of one paragraph gives one document per line.

Every problem raises DatasetError naming the file, the line and the reason, so a user can fix it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from training.data.examples import (CHAT_ROLES, ChatTurn, ClassificationExample, CompletionExample, Dataset, Example,
                                     TextExample)
from training.errors import DatasetError

CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
CLASSIFICATION_COLUMNS = ("text", "label")
COMPLETION_COLUMNS = ("prompt", "completion")
MESSAGES_KEY = "messages"
MIN_CLASSES = 2


def load_file(path: Path, task: str) -> Dataset:
    """Parse a CSV or JSONL file into a Dataset of `task` rows; DatasetError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (and not a bundled data set name)")
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES and task == "pretrain":
        return _documents(path, text)
    if suffix in CSV_SUFFIXES:
        rows = _csv_records(path, text)
    elif suffix in JSONL_SUFFIXES:
        rows = _jsonl_records(path, text)
    else:
        plain = f" ({', '.join(TEXT_SUFFIXES)} is raw text for --task pretrain)" if suffix in TEXT_SUFFIXES else ""
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r} for {task}; use .csv or .jsonl{plain}")
    if task == "classification":
        dataset = _classification(path, rows)
    elif task == "pretrain":
        dataset = Dataset(path.name, "pretrain", tuple(TextExample(_text_field(path, line, row, "text"))
                                                       for line, row in rows))
    else:
        dataset = Dataset(path.name, "completion", tuple(_completion(path, line, row) for line, row in rows))
    if not dataset.examples:
        raise DatasetError(f"{path}: no data rows")
    return dataset


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from exc


def _fail(path: Path, line: int, reason: str) -> DatasetError:
    return DatasetError(f"{path}:{line}: {reason}")


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number where the record starts, row) for each CSV record; the header is line 1."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise _fail(path, reader.line_num, f"malformed CSV header: {exc}") from exc
    if header is None or not any(h.strip() for h in header):
        raise DatasetError(f"{path}: empty file (a header line such as 'text,label' is needed)")
    columns = [h.strip() for h in header]
    start = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _fail(path, start, f"malformed CSV: {exc}") from exc
        if values and any(v.strip() for v in values):
            if len(values) != len(columns):
                raise _fail(path, start, f"expected {len(columns)} fields ({','.join(columns)}), found {len(values)}")
            yield start, dict(zip(columns, values))
        start = reader.line_num + 1


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(path, line_no, f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(row, dict):
            raise _fail(path, line_no, f"each line must be a JSON object, got {type(row).__name__}")
        yield line_no, row


def _text_field(path: Path, line: int, row: dict[str, Any], key: str) -> str:
    if key not in row:
        raise _fail(path, line, f"missing {key!r} (found: {', '.join(sorted(map(str, row))) or 'nothing'})")
    value = row[key]
    if isinstance(value, (dict, list)) or value is None:
        raise _fail(path, line, f"{key!r} must be text, got {type(value).__name__}")
    value = str(value)
    if not value.strip():
        raise _fail(path, line, f"{key!r} is empty")
    return value


def _classification(path: Path, rows: Iterator[tuple[int, dict[str, Any]]]) -> Dataset:
    pairs = [(_text_field(path, line, row, "text").strip(), _text_field(path, line, row, "label").strip())
             for line, row in rows]
    labels = tuple(sorted({label for _, label in pairs}))
    if pairs and len(labels) < MIN_CLASSES:
        raise DatasetError(f"{path}: classification needs at least {MIN_CLASSES} labels, found {list(labels)}")
    index = {label: i for i, label in enumerate(labels)}
    examples: tuple[Example, ...] = tuple(ClassificationExample(text, index[label]) for text, label in pairs)
    return Dataset(path.name, "classification", examples, labels)


def _completion(path: Path, line: int, row: dict[str, Any]) -> CompletionExample:
    if MESSAGES_KEY in row:
        return _chat(path, line, row[MESSAGES_KEY])
    prompt = _text_field(path, line, row, "prompt")
    return CompletionExample(prompt, _text_field(path, line, row, "completion"))


def _chat(path: Path, line: int, messages: Any) -> CompletionExample:
    if not isinstance(messages, list) or len(messages) < 2:
        raise _fail(path, line, f"{MESSAGES_KEY!r} must be a list of at least two turns")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in CHAT_ROLES or not isinstance(turn.get("content"), str):
            raise _fail(path, line, f"{MESSAGES_KEY}[{i}] must be {{role: {'|'.join(CHAT_ROLES)}, content: text}}")
        turns.append(ChatTurn(turn["role"], turn["content"]))
    if turns[-1].role != "assistant" or not turns[-1].content.strip():
        raise _fail(path, line, f"the last of {MESSAGES_KEY!r} must be a non-empty assistant turn (the answer)")
    context = tuple(turns[:-1])
    last_user = next((t.content for t in reversed(context) if t.role == "user"), "")
    return CompletionExample(last_user, turns[-1].content, context)


def _documents(path: Path, text: str) -> Dataset:
    """A .txt file's paragraphs (blank-line separated) as documents; one paragraph alone is split into lines."""
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if len(paragraphs) == 1:
        paragraphs = [line.strip() for line in paragraphs[0].splitlines() if line.strip()]
    if not paragraphs:
        raise DatasetError(f"{path}: no text (the file is empty or blank)")
    return Dataset(path.name, "pretrain", tuple(TextExample(p) for p in paragraphs))
