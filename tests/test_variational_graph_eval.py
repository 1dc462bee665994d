"""Bayesian graph contrastive learning (marglik.variational.graph), the evaluation side.

Few-label splits, the linear probe against scikit-learn's logistic regression, the
misclassification AUROC against a count over all pairs, the binned error rate by hand, the
contextual SBM's edge densities, and a short training run that must beat chance clearly.
"""

import math

import pytest
import torch

from marglik.errors import MarglikError
from marglik.variational.graph import (
    GCNEncoder,
    binned_error_rate,
    contextual_sbm,
    few_label_split,
    fit_linear_probe,
    misclassification_auroc,
    normalized_adjacency,
    train_contrastive,
)


def test_few_label_split_takes_k_per_class_and_the_rest_for_test():
    y = torch.tensor([0, 1, 2] * 10 + [2] * 5)
    train, test = few_label_split(y, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(y[train]).tolist() == [3, 3, 3]
    assert sorted(train.tolist() + test.tolist()) == list(range(35))
    again, _ = few_label_split(y, 3, torch.Generator().manual_seed(0))
    other, _ = few_label_split(y, 3, torch.Generator().manual_seed(1))
    assert torch.equal(train, again) and not torch.equal(train, other)
    with pytest.raises(MarglikError, match="more than k=10"):
        few_label_split(y, 10)
    with pytest.raises(MarglikError, match="positive integer"):
        few_label_split(y, 0)


def test_linear_probe_matches_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    h, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    lam = 0.05
    probe = fit_linear_probe(h, y, 3, l2=lam)
    z = torch.nn.functional.normalize(h, dim=1)
    ref = linear_model.LogisticRegression(C=1 / (lam * 40), tol=1e-12, max_iter=10000)
    ref.fit(z.numpy(), y.numpy())
    expected = torch.tensor(ref.predict_proba(z.numpy()))
    torch.testing.assert_close(probe.probs(h), expected, rtol=0, atol=1e-6)
    with pytest.raises(MarglikError, match="must match"):
        fit_linear_probe(h, y[:3], 3)
    with pytest.raises(MarglikError, match="labels must lie"):
        fit_linear_probe(h, y + 1, 3)


def test_misclassification_auroc_counts_pairs():
    u = torch.rand(30)
    correct = torch.rand(30) > 0.4
    pairs = [(float(a > b) + 0.5 * float(a == b)) for a in u[~correct] for b in u[correct]]
    torch.testing.assert_close(misclassification_auroc(u, correct).item(),
                               sum(pairs) / len(pairs))
    assert misclassification_auroc(torch.tensor([0.1, 0.2, 0.9]),
                                   torch.tensor([True, True, False])) == 1.0
    with pytest.raises(MarglikError, match="both right and wrong"):
        misclassification_auroc(u, torch.ones(30, dtype=torch.bool))


def test_binned_error_rate_by_hand():
    u = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    correct = torch.tensor([False, True, True, True, False, True])
    mean_u, err = binned_error_rate(u, correct, n_bins=3)
    # sorted: (0.1 ✓, 0.2 ✓), (0.3 ✓, 0.5 ✓), (0.7 ✗, 0.9 ✗)
    torch.testing.assert_close(mean_u, torch.tensor([0.15, 0.4, 0.8]))
    torch.testing.assert_close(err, torch.tensor([0.0, 0.0, 1.0]))


def test_contextual_sbm_densities_labels_and_seed():
    d = contextual_sbm(300, 3, 4, p_in=0.06, p_out=0.01, mean_distance=2.0, seed=1)
    assert d.x.shape == (300, 4) and d.n_classes == 3
    assert torch.bincount(d.y).tolist() == [100, 100, 100]
    i, j = d.edge_index
    assert (i < j).all()
    same = d.y[i] == d.y[j]
    n_same, n_diff = 3 * 100 * 99 / 2, 300 * 299 / 2 - 3 * 100 * 99 / 2
    for count, pairs, p in ((same.sum(), n_same, 0.06), ((~same).sum(), n_diff, 0.01)):
        assert abs(float(count) / pairs - p) < 5 * math.sqrt(p * (1 - p) / pairs)
    assert torch.equal(contextual_sbm(300, 3, 4, seed=1).edge_index,
                       contextual_sbm(300, 3, 4, seed=1).edge_index)
    assert not torch.equal(contextual_sbm(300, 3, 4, seed=1).x, contextual_sbm(300, 3, 4).x)
    with pytest.raises(MarglikError, match="n_classes"):
        contextual_sbm(10, 1)
    with pytest.raises(MarglikError, match="p_in"):
        contextual_sbm(10, 2, p_in=1.5)


@pytest.mark.parametrize("variational", [False, True])
def test_short_training_beats_chance_on_the_csbm(variational):
    d = contextual_sbm(150, 3, 8, p_in=0.1, p_out=0.005, mean_distance=1.5, seed=0)
    enc = GCNEncoder(8, 16, 8, variational=variational)
    history = train_contrastive(enc, d.x, d.edge_index, epochs=40, lr=1e-2, seed=0,
                                kl_weight=0.1)
    assert len(history) == 40 and sum(history[-5:]) > sum(history[:5])  # noisy: 5 each
    h = enc(d.x, normalized_adjacency(d.edge_index, 150)).detach()
    train, test = few_label_split(d.y, 5, torch.Generator().manual_seed(0))
    acc = (fit_linear_probe(h[train], d.y[train], 3).probs(h[test]).argmax(1) == d.y[test])
    assert acc.double().mean() > 0.8
