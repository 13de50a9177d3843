"""Training fixtures: small data files and TrainConfigs aimed at the tiny random bases (fast on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import TrainConfig

QA_PAIRS = [
    ("What colour is the sky?", "Blue."),
    ("What colour is grass?", "Green."),
    ("What is two plus two?", "Four."),
    ("Name a large animal.", "An elephant."),
    ("Where do fish live?", "In water."),
    ("What do bees make?", "Honey."),
    ("What is frozen water called?", "Ice."),
    ("Which star warms the Earth?", "The Sun."),
]
TINY_STEPS = 30
TINY_LR = 1e-2


@pytest.fixture(scope="session")
def qa_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 chat rows (8 pairs x 3) in the `messages` shape."""
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for q, a in QA_PAIRS * 3
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 rows, two labels that a bag of words separates easily."""
    path = tmp_path_factory.mktemp("data") / "sentiment.csv"
    good = ["great film, loved it", "wonderful and moving", "a joy to watch", "brilliant acting, great story"]
    bad = ["awful film, hated it", "boring and dull", "a waste of time", "terrible acting, awful story"]
    rows = ["text,label"] + [f'"{t}",pos' for t in good * 5] + [f'"{t}",neg' for t in bad * 5]
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_config(base: Path, data: Path | str, out: Path, **overrides) -> TrainConfig:
    """A TrainConfig for a seconds-long run on a tiny base."""
    values = dict(base=str(base), data=str(data), out=out, max_steps=TINY_STEPS, batch_size=4, lr=TINY_LR,
                  lora_r=4, lora_alpha=8, lora_dropout=0.0, val_fraction=0.25, eval_batch_size=8)
    values.update(overrides)
    return TrainConfig(**values)
