"""Classification figures against a hand-computed example and against reference loops on random labels."""

from __future__ import annotations

import random

import pytest

from training.metrics import classification_report


def test_report_matches_a_hand_computation() -> None:
    # true:  a a a b b c ; predicted: a a b b c c
    report = classification_report([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ("a", "b", "c"))
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report["accuracy"] == pytest.approx(4 / 6, abs=1e-4)
    a, b, c = (report["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3, abs=1e-4), 3)
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 0.5, 0.5)
    assert (c["precision"], c["recall"]) == (0.5, 1.0)
    assert report["precision_macro"] == pytest.approx((1 + 0.5 + 0.5) / 3, abs=1e-4)
    assert report["f1_macro"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3, abs=1e-4)
    assert report["majority_baseline_accuracy"] == 0.5


def test_a_class_never_predicted_scores_zero_not_an_error() -> None:
    report = classification_report([0, 1], [0, 0], ("x", "y"))
    assert report["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def _reference(y_true: list[int], y_pred: list[int], n: int) -> dict:
    """The textbook definitions, one class at a time, written as plainly as possible (no shared code)."""
    per_class = []
    for c in range(n):
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred) if t == c and p != c)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0  # the same harmonic mean, from counts
        per_class.append((precision, recall, f1, tp + fn))
    matrix = [[sum(1 for t, p in zip(y_true, y_pred) if (t, p) == (i, j)) for j in range(n)] for i in range(n)]
    return {
        "accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true),
        "per_class": per_class,
        "macro": [sum(row[k] for row in per_class) / n for k in range(3)],
        "matrix": matrix,
    }


@pytest.mark.parametrize("seed", range(8))
def test_report_matches_reference_loops_on_random_labels(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 7)
    rows = rng.randint(1, 60)
    y_true = [rng.randrange(n) for _ in range(rows)]
    y_pred = [t if rng.random() < 0.5 else rng.randrange(n) for t in y_true]
    labels = tuple(f"class{i}" for i in range(n))
    report = classification_report(y_true, y_pred, labels)
    expected = _reference(y_true, y_pred, n)
    assert report["confusion_matrix"] == expected["matrix"]
    assert report["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-4)
    for label, (precision, recall, f1, support) in zip(labels, expected["per_class"]):
        got = report["per_class"][label]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision, recall, f1), abs=1e-4)
        assert got["support"] == support
    macro = (report["precision_macro"], report["recall_macro"], report["f1_macro"])
    assert macro == pytest.approx(tuple(expected["macro"]), abs=1e-4)
