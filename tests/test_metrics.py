"""Tests for marglik.metrics against hand-computed values and independent references."""

import math

import pytest
import torch

from marglik import metrics as M

# Four 3-class predictions used for the calibration tests.
#   a: conf 0.9, pred 0, y 0 -> correct
#   b: conf 0.7, pred 1, y 0 -> wrong
#   c: conf 0.6, pred 2, y 2 -> correct
#   d: conf 0.4, pred 0, y 1 -> wrong
PROBS4 = torch.tensor(
    [[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.4, 0.35, 0.25]], dtype=torch.float64
)
Y4 = torch.tensor([0, 0, 2, 1])


def test_ece_by_hand_two_bins():
    # Bins (0, 0.5] and (0.5, 1].
    # Bin 1: {d}: conf 0.4, acc 0 -> |gap| 0.4, weight 1/4 -> 0.1
    # Bin 2: {a, b, c}: conf (0.9 + 0.7 + 0.6) / 3 = 2.2 / 3, acc 2 / 3 -> gap 0.2 / 3,
    #        weight 3/4 -> 0.05
    # ECE = 0.15
    assert M.ece(PROBS4, Y4, n_bins=2).item() == pytest.approx(0.15, abs=1e-12)
    bins = M.calibration_bins(PROBS4, Y4, n_bins=2)
    assert bins.count.tolist() == [1, 3]
    assert bins.confidence.tolist() == pytest.approx([0.4, 2.2 / 3])
    assert bins.accuracy.tolist() == pytest.approx([0.0, 2 / 3])
    assert bins.edges.tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_ece_single_bin_is_gap_of_means():
    # One bin: mean conf (0.9 + 0.7 + 0.6 + 0.4) / 4 = 0.65, accuracy 2/4 -> 0.15
    assert M.ece(PROBS4, Y4, n_bins=1).item() == pytest.approx(0.15)


def test_ece_perfect_and_empty_bins():
    # Every prediction is one-hot and correct: confidence 1, accuracy 1 -> ECE 0.
    probs = torch.eye(3)
    y = torch.arange(3)
    assert M.ece(probs, y).item() == 0.0
    bins = M.calibration_bins(probs, y, n_bins=15)
    assert bins.count.sum().item() == 3 and bins.count[-1].item() == 3
    assert bins.count[:-1].sum().item() == 0


def test_calibration_bins_right_closed():
    # A confidence of exactly 0.5 belongs to the bin (0, 0.5], 0.75 to (0.5, 1].
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25]])
    bins = M.calibration_bins(probs, torch.tensor([0, 0]), n_bins=2)
    assert bins.count.tolist() == [1, 1]


def test_brier_nll_accuracy_2x2():
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    # row 1: 0.2^2 + 0.2^2 = 0.08; row 2: 0.7^2 + 0.7^2 = 0.98; mean 0.53
    assert M.brier(probs, y).item() == pytest.approx(0.53)
    # -(log 0.8 + log 0.3) / 2
    assert M.nll(probs, y).item() == pytest.approx(-(math.log(0.8) + math.log(0.3)) / 2)
    assert M.accuracy(probs, y).item() == 0.5


def test_nll_clamps_zero_probability():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    val = M.nll(probs, torch.tensor([1, 0]), eps=1e-10)
    assert math.isfinite(val.item())
    assert val.item() == pytest.approx((-math.log(1e-10) - math.log(0.5)) / 2)


def test_nll_matches_cross_entropy():
    logits = torch.randn(50, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (50,))
    ref = torch.nn.functional.cross_entropy(logits, y)
    assert M.nll(logits.softmax(-1), y).item() == pytest.approx(ref.item(), rel=1e-10)


def test_confidence_and_entropy():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert M.confidence(probs).tolist() == [0.25, 1.0, 0.5]
    assert M.entropy(probs).tolist() == pytest.approx([math.log(4), 0.0, math.log(2)])


def _auroc_bruteforce(s_in, s_out):
    total = 0.0
    for a in s_in.tolist():
        for b in s_out.tolist():
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(s_in) * len(s_out))


def test_ood_auroc_by_hand():
    s_in = torch.tensor([0.9, 0.6, 0.6])
    s_out = torch.tensor([0.6, 0.2])
    # pairs: (0.9,0.6)=1 (0.9,0.2)=1 (0.6,0.6)=0.5 (0.6,0.2)=1 (0.6,0.6)=0.5 (0.6,0.2)=1 -> 5/6
    assert M.ood_auroc(s_in, s_out).item() == pytest.approx(5 / 6)
    assert _auroc_bruteforce(s_in, s_out) == pytest.approx(5 / 6)


def test_ood_auroc_extremes():
    assert M.ood_auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])).item() == 1.0
    assert M.ood_auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])).item() == 0.0
    assert M.ood_auroc(torch.ones(3), torch.ones(5)).item() == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ood_auroc_matches_bruteforce_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    s_in = torch.randint(0, 6, (23,), generator=g).float()
    s_out = torch.randint(0, 5, (17,), generator=g).float()
    assert M.ood_auroc(s_in, s_out).item() == pytest.approx(_auroc_bruteforce(s_in, s_out))


def test_rmse_by_hand():
    mean = torch.tensor([1.0, 2.0, 3.0])
    y = torch.tensor([2.0, 2.0, 5.0])
    # squared errors 1, 0, 4 -> sqrt(5/3)
    assert M.rmse(mean, y).item() == pytest.approx(math.sqrt(5 / 3))


def test_gaussian_nll_matches_torch_normal():
    mean = torch.randn(40, 3, dtype=torch.float64)
    var = torch.rand(40, 3, dtype=torch.float64) + 0.1
    y = torch.randn(40, 3, dtype=torch.float64)
    ref = -torch.distributions.Normal(mean, var.sqrt()).log_prob(y).mean()
    assert M.gaussian_nll(mean, var, y).item() == pytest.approx(ref.item(), rel=1e-12)


def test_regression_accepts_n_and_n1_shapes():
    mean = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([1.0, 1.0])
    assert M.rmse(mean, y).item() == pytest.approx(math.sqrt(0.5))
    assert M.gaussian_nll(mean, torch.ones(2), y).item() == pytest.approx(
        0.5 * math.log(2 * math.pi) + 0.25
    )


def test_interval_coverage_by_hand():
    # Standard normal predictive; central intervals: 50% |y| <= 0.6745, 90% |y| <= 1.6449,
    # 95% |y| <= 1.9600.
    y = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.5])
    cov = M.interval_coverage(torch.zeros(5), torch.ones(5), y)
    assert cov.tolist() == pytest.approx([2 / 5, 4 / 5, 4 / 5])
    # With var = 4 (std 2): 50% |y| <= 1.349 -> 3/5; 90% |y| <= 3.29 -> 5/5
    cov2 = M.interval_coverage(torch.zeros(5), torch.full((5,), 4.0), y, levels=(0.5, 0.9))
    assert cov2.tolist() == pytest.approx([3 / 5, 1.0])
    # calibration error over levels (0.5, 0.9) = (|0.4 - 0.5| + |0.8 - 0.9|) / 2 = 0.1
    err = M.regression_calibration_error(torch.zeros(5), torch.ones(5), y, levels=(0.5, 0.9))
    assert err.item() == pytest.approx(0.1)


def test_regression_calibration_large_sample():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(20000, generator=g, dtype=torch.float64)
    mean = torch.zeros_like(y)
    # correctly specified: coverage close to nominal at every level
    assert M.regression_calibration_error(mean, torch.ones_like(y), y).item() < 0.01
    # over-confident (std 0.5): the 50% interval |y| <= 0.5 * 0.67449 covers
    # erf(0.33724 / sqrt(2)) ~= 0.264
    cov = M.interval_coverage(mean, torch.full_like(y, 0.25), y, levels=(0.5,))
    assert cov.item() == pytest.approx(math.erf(0.5 * 0.6744898 / math.sqrt(2)), abs=0.015)
    assert M.regression_calibration_error(mean, torch.full_like(y, 0.25), y).item() > 0.1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: M.nll(torch.tensor([[0.5, 0.6]]), torch.tensor([0])), "sum to 1"),
        (lambda: M.ece(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), "sum to 1|\\[0, 1\\]"),
        (lambda: M.brier(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0])), "NaN"),
        (lambda: M.accuracy(torch.full((3, 2), 0.5), torch.tensor([0, 1])), "3 rows"),
        (lambda: M.nll(torch.full((2, 2), 0.5), torch.tensor([0, 2])), r"\[0, 1\]"),
        (lambda: M.nll(torch.full((2,), 0.5), torch.tensor([0, 1])), r"\(N, C\)"),
        (lambda: M.brier(torch.full((2, 2), 0.5), torch.tensor([[0], [1]])), r"\(N,\)"),
        (lambda: M.ood_auroc(torch.tensor([1.0, float("nan")]), torch.ones(2)), "NaN"),
        (lambda: M.ood_auroc(torch.ones(2), torch.ones(0)), "empty"),
        (lambda: M.rmse(torch.zeros(3), torch.zeros(4)), "shape"),
        (lambda: M.gaussian_nll(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3)),
         "positive"),
        (lambda: M.gaussian_nll(torch.zeros(2, 2), torch.ones(2, 3), torch.zeros(2, 2)),
         "shape"),
        (lambda: M.gaussian_nll(torch.zeros(2), torch.ones(2), torch.tensor([0.0, float("nan")])),
         "NaN"),
        (lambda: M.interval_coverage(torch.zeros(2), torch.ones(2), torch.zeros(2), levels=(1.0,)),
         "between 0 and 1"),
        (lambda: M.ece(torch.full((2, 2), 0.5), torch.tensor([0, 1]), n_bins=0), "n_bins"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
