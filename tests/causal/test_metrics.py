"""Accuracy and AUDRC on hand-computed examples."""

import pytest

from marglik.applications.causal.metrics import accuracy, audrc


def test_accuracy_plain_and_weighted():
    pred = ["x->y", "y->x", "x->y"]
    truth = ["x->y", "x->y", "x->y"]
    assert accuracy(pred, truth) == pytest.approx(2 / 3)
    assert accuracy(pred, truth, weights=[1, 2, 1]) == pytest.approx(2 / 4)
    assert accuracy(pred, truth, weights=[0, 1, 0]) == 0.0


def test_audrc_hand_computed():
    confidences = [0.9, 0.1, 0.5, 0.7]
    correct = [True, False, False, True]
    # ranked: 0.9 ✓, 0.7 ✓, 0.5 ✗, 0.1 ✗ → running accuracy 1, 1, 2/3, 1/2
    assert audrc(confidences, correct) == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)
    # weights (1, 1, 2, 2) → ranked weights 1, 2, 2, 1; running accuracy 1, 1, 3/5, 3/6
    expected = (1 * 1 + 2 * 1 + 2 * 0.6 + 1 * 0.5) / 6
    assert audrc(confidences, correct, weights=[1, 1, 2, 2]) == pytest.approx(expected)


def test_audrc_extremes_and_ties():
    assert audrc([3, 2, 1], [True, True, True]) == 1.0
    assert audrc([3, 2, 1], [False, False, False]) == 0.0
    # informative confidence: the correct decisions first → above plain accuracy (1/2)
    assert audrc([2, 1], [True, False]) == pytest.approx(0.75)
    assert audrc([1, 2], [True, False]) == pytest.approx(0.25)
    # ties keep input order (stable sort)
    assert audrc([1, 1], [True, False]) == pytest.approx(0.75)


def test_bad_input():
    with pytest.raises(ValueError):
        audrc([1, 2], [True])
    with pytest.raises(ValueError):
        accuracy([], [])
    with pytest.raises(ValueError, match="weights"):
        accuracy(["x->y"], ["x->y"], weights=[-1])
