"""Classification figures against hand-computed values."""

from __future__ import annotations

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
