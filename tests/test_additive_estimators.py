"""scikit-learn estimators and plots of LA-NAM (applications/additive)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.model_selection import cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from marglik.applications.additive import (  # noqa: E402
    LaplaceAdditiveClassifier,
    LaplaceAdditiveRegressor,
    plot_shape_functions,
)

torch.set_num_threads(1)
FAST = dict(hidden=(4,), n_epochs=6, batch_size=None, n_epochs_burnin=2, marglik_frequency=2,
            n_hypersteps=5)


def _regression(n=60, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -2.0]
    y = 3 * np.sin(2 * X[:, 0]) + 0.2 * X[:, 1] + 0.1 * rng.standard_normal(n) + 100
    return X, y


def test_regressor_predicts_in_original_units_and_is_reproducible():
    X, y = _regression()
    a = LaplaceAdditiveRegressor(random_state=3, **FAST).fit(X, y)
    b = LaplaceAdditiveRegressor(random_state=3, **FAST).fit(X, y)
    mean, std = a.predict(X, return_std=True)
    assert mean.shape == std.shape == (60,)
    np.testing.assert_array_equal(mean, b.predict(X))
    assert (std > 0).all()
    assert abs(mean.mean() - y.mean()) < 1.0  # targets are un-standardised
    assert a.feature_importances_.shape == (3,)
    assert a.feature_importances_.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(a.feature_importances_,
                               (1 / a.prior_precisions_[:3]) / (1 / a.prior_precisions_[:3]).sum())
    assert np.isfinite(a.log_marginal_likelihood_) and np.isfinite(a.score(X, y))
    assert a.n_features_in_ == 3 and a.fit_seconds_ > 0


def test_regressor_shape_functions_are_in_original_units():
    X, y = _regression()
    r = LaplaceAdditiveRegressor(random_state=0, **FAST).fit(X, y)
    sf = r.shape_functions(n_points=7)
    assert sf["grid"].shape == (7, 3) and sf["mean"].shape == sf["std"].shape == (7, 3, 1)
    np.testing.assert_allclose(sf["grid"][0], X.min(0), rtol=1e-6)
    np.testing.assert_allclose(sf["grid"][-1], X.max(0), rtol=1e-6)
    # the band is the standardised one times the target scale
    raw = r.fit_
    from marglik.applications.additive import shape_functions

    ref = shape_functions(raw.la, raw.model, r._train_x_, n_points=7)
    np.testing.assert_allclose(sf["std"], ref.std.double().numpy() * r.y_std_, rtol=1e-6)


def test_heteroscedastic_regressor_and_interactions():
    X, y = _regression(80)
    r = LaplaceAdditiveRegressor(heteroscedastic=True, n_interactions=1, random_state=0,
                                 **FAST).fit(X, y)
    mean, std = r.predict(X[:5], return_std=True)
    assert mean.shape == (5,) and (std > 0).all()
    assert len(r.interaction_pairs_) == 1 and r.prior_precisions_.shape == (4,)
    assert r.shape_functions(5)["mean"].shape == (5, 3, 2)
    assert np.isfinite(r.log_likelihood(X, y))


def test_classifier_labels_probabilities_and_pickle():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 2))
    y = np.where(X[:, 0] + 0.3 * rng.standard_normal(80) > 0, "yes", "no")
    c = LaplaceAdditiveClassifier(random_state=0, **FAST).fit(X, y)
    proba = c.predict_proba(X)
    assert proba.shape == (80, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert set(c.predict(X)) <= {"no", "yes"} and list(c.classes_) == ["no", "yes"]
    again = pickle.loads(pickle.dumps(c))
    np.testing.assert_array_equal(again.predict_proba(X), proba)
    with pytest.raises(ValueError, match="needs binary labels"):
        LaplaceAdditiveClassifier(**FAST).fit(X, np.arange(80) % 3)


def test_estimators_work_in_pipelines_and_cross_validation():
    X, y = _regression()
    pipe = make_pipeline(StandardScaler(), LaplaceAdditiveRegressor(random_state=0, **FAST))
    scores = cross_val_score(pipe, X, y, cv=2)
    assert scores.shape == (2,) and np.isfinite(scores).all()
    c = clone(LaplaceAdditiveRegressor(n_interactions=2, random_state=1))
    assert c.get_params()["n_interactions"] == 2


def test_estimators_name_bad_input():
    X, y = _regression()
    with pytest.raises(ValueError, match="n_epochs must be a positive integer"):
        LaplaceAdditiveRegressor(n_epochs=0).fit(X, y)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        LaplaceAdditiveRegressor(lr=float("nan")).fit(X, y)
    with pytest.raises(ValueError, match="n_interactions must be at most 3"):
        LaplaceAdditiveRegressor(n_interactions=4, **FAST).fit(X, y)
    with pytest.raises(ValueError, match="NaN"):
        LaplaceAdditiveRegressor(**FAST).fit(np.full_like(X, np.nan), y)
    with pytest.raises(ValueError, match="patience must be an integer"):
        LaplaceAdditiveRegressor(patience=1.5, **FAST).fit(X, y)
    r = LaplaceAdditiveRegressor(random_state=0, **FAST).fit(X, y)
    with pytest.raises(ValueError, match="3 features"):
        r.predict(X[:, :2])


def test_plot_shape_functions_draws_bands_truth_and_rug():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    grid = np.linspace(-1, 1, 9)[:, None].repeat(3, 1)
    mean, std = np.sin(grid), 0.1 + 0 * grid
    X = np.random.default_rng(0).uniform(-1, 1, (20, 3))
    fig = plot_shape_functions(grid, mean, std, X, ["a", "b", "c"],
                               truth=[np.sin, None, None], ncols=2, importances=np.ones(3) / 3)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3 and axes[1].get_title() == "b (0.33)"
    assert len(axes[0].collections) == 1  # the band
    assert len(axes[0].lines) == 3 and len(axes[1].lines) == 2  # mean, (truth,) rug
    np.testing.assert_allclose(axes[0].lines[-1].get_xdata(), X[:, 0])
    with pytest.raises(ValueError, match="feature_names must have 3 entries"):
        plot_shape_functions(grid, mean, std, feature_names=["a"])
    matplotlib.pyplot.close(fig)


def test_the_additive_estimators_are_exported_from_marglik():
    import marglik
    from marglik.applications import additive

    assert marglik.LaplaceAdditiveRegressor is additive.LaplaceAdditiveRegressor
    assert marglik.LaplaceAdditiveClassifier is additive.LaplaceAdditiveClassifier
    assert {"LaplaceAdditiveRegressor", "LaplaceAdditiveClassifier"} <= set(marglik.__all__)


def test_patience_reaches_fit_additive_and_ends_stage_one_early():
    X, y = _regression()
    kw = dict(FAST, n_epochs=200)
    full = LaplaceAdditiveRegressor(random_state=0, **kw).fit(X, y)
    stopped = LaplaceAdditiveRegressor(random_state=0, patience=np.int64(2), **kw).fit(X, y)
    assert full.fit_.epochs_run == 200 and stopped.fit_.options["patience"] == 2
    assert stopped.fit_.epochs_run < 200
    # the stopped run is the beginning of the full one
    n = stopped.fit_.epochs_run
    assert stopped.fit_.history["loss"] == full.fit_.history["loss"][:n]
