"""Reference mode, batched pairs, the evidence-selected spline, LOCI_E and its marginal evidence."""

import itertools

import numpy as np
import pytest

from marglik.applications.causal.estimators import (
    EvidenceSplineEstimator,
    SplineEstimator,
    make_estimator,
    standardise,
)
from marglik.applications.causal.hsic import gaussian_gram, hsic
from marglik.applications.causal.loci import loci, loci_many
from marglik.applications.causal.marginal import marginal_log_evidence

from .conftest import lsnm_pair

REF_NN = {"steps": 150}


def test_reference_spline_is_the_authors_objective(pair):
    x, y = (v[:300] for v in pair)
    result = loci(x, y, method="loci-m", reference=True)
    assert result.direction == "x->y"
    assert result.details["ridge_x->y"] == pytest.approx(1e-5 / len(x))  # δ = 1e-5 on the sum
    est = make_estimator("spline", reference=True, ridge=1e-5 / len(x))
    assert est.floor == 1e-7 and est.n_knots == 25 and est.degree == 5


def test_reference_nn_decides_and_uses_min_loss(pair):
    x, y = (v[:200] for v in pair)
    result = loci(x, y, estimator="nn", reference=True, estimator_options=REF_NN, all_scores=True)
    assert result.direction == "x->y" and result.details["scores"]["loci-m"] > 0
    assert "loci-e" not in result.details["scores"]  # no evidence for the maximum-likelihood NN


def test_loci_many_equals_one_pair_at_a_time():
    pairs = [lsnm_pair(n, seed) for seed, n in enumerate([100, 140, 100])]
    pairs.append(pairs[0][::-1])
    options = {"estimator": "nn", "reference": True, "estimator_options": REF_NN}
    many = loci_many(pairs, **options)
    for (x, y), batched in zip(pairs, many, strict=True):
        alone = loci(x, y, **options)
        assert batched.score == pytest.approx(alone.score, rel=1e-8, abs=1e-12)
        assert batched.details["log_lik_x->y"] == pytest.approx(alone.details["log_lik_x->y"])
    assert many[0].score == pytest.approx(-many[3].score, rel=1e-6)  # swapped pair, same fits


def test_hsic_loci_bandwidth_brute_force():
    rng = np.random.default_rng(0)
    a = np.round(rng.normal(size=12), 1)  # ties: zero distances the authors' median skips
    b = a**2 + 0.2 * rng.normal(size=12)
    d2 = [(a[i] - a[j]) ** 2 for i, j in itertools.combinations(range(12), 2)]
    s2 = 0.5 * np.median([d for d in d2 if d > 0])
    K = np.exp(-((a[:, None] - a[None]) ** 2) / (2 * s2))
    np.testing.assert_allclose(gaussian_gram(a, "loci"), K, rtol=1e-12)
    H = np.eye(12) - 1 / 12
    L = gaussian_gram(b, "loci")
    assert hsic(a, b, bandwidth="loci") == pytest.approx(np.trace(K @ H @ L @ H) / 144, rel=1e-10)
    with pytest.raises(ValueError, match="bandwidth"):
        hsic(a, b, bandwidth="silverman")


def test_evidence_spline_keeps_the_best_knots(pair):
    x, y = map(standardise, pair)
    est = EvidenceSplineEstimator(knots_grid=(4, 8)).fit(x, y)
    fits = {k: SplineEstimator(n_knots=k).fit(x, y) for k in (4, 8)}
    best = max(fits, key=lambda k: fits[k].log_evidence_)
    assert est.n_knots_ == best and est.log_evidence_ == fits[best].log_evidence_
    np.testing.assert_allclose(est.log_lik(x, y), fits[best].log_lik(x, y))
    with pytest.raises(ValueError, match="knots"):
        EvidenceSplineEstimator(knots_grid=(1,))


def test_marginal_evidence_is_minus_half_bic():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    v = standardise(np.r_[rng.normal(-2, 0.4, 300), rng.normal(2, 0.4, 300)])
    value, k = marginal_log_evidence(v, max_components=3)
    assert k == 2  # two clear modes
    bics = [
        GaussianMixture(c, n_init=5, random_state=0, reg_covar=1e-6).fit(v[:, None]).bic(v[:, None])
        for c in (1, 2, 3)
    ]
    assert value == pytest.approx(-min(bics) / (2 * len(v)), rel=1e-10)
    # one Gaussian: −BIC/2 = the Gaussian log-likelihood at the MLE − (2/2) log n, by hand
    g = rng.normal(size=400)
    one, _ = marginal_log_evidence(g, max_components=1)
    mle = -0.5 * np.log(2 * np.pi * g.var()) - 0.5
    assert one == pytest.approx(mle - np.log(400) / 400, rel=1e-6)


def test_loci_e_finds_the_direction(pair):
    x, y = pair
    forward = loci(x, y, method="loci-e", estimator="spline-ev")
    backward = loci(y, x, method="loci-e", estimator="spline-ev")
    assert forward.direction == "x->y" and backward.direction == "y->x"
    d = forward.details
    assert forward.score == pytest.approx(d["joint_evidence_x->y"] - d["joint_evidence_y->x"])
    assert backward.score == pytest.approx(-forward.score, rel=1e-6)
    with pytest.raises(ValueError, match="loci-e"):
        loci(x, y, method="loci-e", estimator="nn")
    with pytest.raises(ValueError, match="reference"):
        loci(x, y, estimator="spline-ev", reference=True)
