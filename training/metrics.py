"""Classification figures from true and predicted class indices, in plain Python.

Macro averages weigh every class equally (so a minority class counts); a class never predicted has
precision 0, never present has recall 0 (the convention of scikit-learn's zero_division=0).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

DIGITS = 4


def _ratio(num: int | float, den: int | float) -> float:
    return num / den if den else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> list[list[int]]:
    """matrix[true][predicted] = count."""
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for t, p in zip(y_true, y_pred, strict=True):
        matrix[t][p] += 1
    return matrix


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """accuracy, macro precision/recall/F1, per-class figures with support, and the confusion matrix
    (rows = true label, columns = predicted, both in `labels` order)."""
    n = len(labels)
    matrix = confusion_matrix(y_true, y_pred, n)
    per_class = {}
    sums = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    for i, label in enumerate(labels):
        true_positive = matrix[i][i]
        predicted = sum(matrix[r][i] for r in range(n))
        actual = sum(matrix[i])
        figures = {"precision": _ratio(true_positive, predicted), "recall": _ratio(true_positive, actual)}
        figures["f1"] = _f1(figures["precision"], figures["recall"])
        for key, value in figures.items():
            sums[key] += value
        per_class[label] = {**{k: round(v, DIGITS) for k, v in figures.items()}, "support": actual}
    counts = Counter(y_true)
    return {
        "rows": len(y_true),
        "accuracy": round(_ratio(sum(matrix[i][i] for i in range(n)), len(y_true)), DIGITS),
        **{f"{key}_macro": round(_ratio(total, n), DIGITS) for key, total in sums.items()},
        "majority_baseline_accuracy": round(_ratio(max(counts.values(), default=0), len(y_true)), DIGITS),
        "per_class": per_class,
        "labels": list(labels),
        "confusion_matrix": matrix,
    }
