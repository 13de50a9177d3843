"""The row types every loader produces, and the Dataset that carries them with their label set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTurn:
    role: str  # one of CHAT_ROLES
    content: str


@dataclass(frozen=True)
class CompletionExample:
    """A prompt and the answer the model should learn to produce (loss is taken on the answer only).

    With `messages`, the prompt is those turns rendered by the tokenizer's chat template (the answer is
    the assistant turn that follows); without, `prompt` is used as raw text.
    """

    prompt: str
    answer: str
    messages: tuple[ChatTurn, ...] = ()


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    label: int  # index into Dataset.labels


@dataclass(frozen=True)
class TextExample:
    """One document of raw text for continued pre-training (loss on every token)."""

    text: str


Example = Union[CompletionExample, ClassificationExample, TextExample]


@dataclass(frozen=True)
class Dataset:
    """Rows of one task. `labels` is the class list in index order (empty for completion and pretrain).

    A multi-task set (`--data a,b`) keeps its sources in `parts`; `examples` is their concatenation, and
    every part's label indices follow the shared `labels`.
    """

    name: str
    task: str
    examples: tuple[Example, ...]
    labels: tuple[str, ...] = ()
    parts: tuple["Dataset", ...] = ()

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, indices: list[int], suffix: str) -> "Dataset":
        return Dataset(f"{self.name}[{suffix}]", self.task, tuple(self.examples[i] for i in indices), self.labels)


def user_turn(question: str) -> tuple[ChatTurn, ...]:
    return (ChatTurn("user", question),)
