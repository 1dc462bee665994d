"""LaplaceRegressor / LaplaceClassifier: their predictive against brute force, and their use in
scikit-learn's tools (Pipeline, ColumnTransformer, cross_val_score, GridSearchCV, pickle)."""

import math
import pickle

import numpy as np
import pytest
import torch
from sklearn.compose import ColumnTransformer
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from torch.func import functional_call, jacrev

import marglik
from marglik.applications import tabular
from marglik.applications.tabular import LaplaceClassifier, LaplaceRegressor

torch.set_num_threads(1)

SMALL = {"hidden_layer_sizes": (8,), "epochs": 40, "evidence_every": 20, "lr": 0.03}


def regression_data(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = 100 + 20 * np.sin(X[:, 0]) - 5 * X[:, 1] + 2 * rng.normal(size=n)
    return X, y


def classification_data(n: int = 90, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    labels = np.array(["bird", "cat", "dog"])
    return X, labels[(X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5).astype(int)]


@pytest.fixture(scope="module")
def regressor() -> LaplaceRegressor:
    X, y = regression_data()
    return LaplaceRegressor(**SMALL, random_state=0).fit(X, y)


@pytest.fixture(scope="module")
def classifier() -> LaplaceClassifier:
    X, y = classification_data()
    return LaplaceClassifier(**SMALL, random_state=0).fit(X, y)


def brute_force_moments(est, X: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) and J Σ Jᵀ (N, C, C) in float64 from dense torch.func Jacobians and an explicit
    inverse of the dense posterior precision, on standardised inputs."""
    la = est.model_.laplace
    net = la.model
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = est.model_.x_scaler.transform(torch.tensor(X))

    def f(p):
        return functional_call(net, p, (x,))

    jac = jacrev(f)(params)  # each (N, C, *shape)
    J = torch.cat([jac[k].flatten(2) for k in params], dim=2)  # (N, C, P), named_parameters order
    cov = torch.linalg.inv(la.posterior_precision.to(torch.float64))
    return f(params).detach(), J @ cov @ J.transpose(1, 2)


# ---- the predictive against brute force ---------------------------------------------------------
def test_regressor_mean_and_std_match_brute_force(regressor):
    X, _ = regression_data(15, seed=7)
    f, var = brute_force_moments(regressor, X)
    y_mean = regressor.model_.y_scaler.mean.item()
    y_std = regressor.model_.y_scaler.std.item()
    sigma = regressor.model_.laplace.sigma_noise.item()
    mean, std_f = regressor.predict(X, return_std=True, noise=False)
    _, std_y = regressor.predict(X, return_std=True)
    np.testing.assert_allclose(mean, (f[:, 0] * y_std + y_mean).numpy(), rtol=1e-10)
    np.testing.assert_allclose(std_f, (var[:, 0, 0].sqrt() * y_std).numpy(), rtol=1e-8)
    np.testing.assert_allclose(std_y, ((var[:, 0, 0] + sigma**2).sqrt() * y_std).numpy(),
                               rtol=1e-8)
    assert regressor.sigma_noise_ == pytest.approx(sigma * y_std, rel=1e-12)
    np.testing.assert_array_equal(regressor.predict(X), mean)


def test_classifier_probabilities_match_brute_force_probit(classifier):
    X, _ = classification_data(12, seed=8)
    f, var = brute_force_moments(classifier, X)
    C = f.shape[1]
    P = torch.eye(C, dtype=torch.float64) - 1.0 / C  # centred logits: softmax ignores a shift
    v = torch.diagonal(P @ var @ P, dim1=1, dim2=2)
    expected = torch.softmax(f @ P / torch.sqrt(1 + math.pi / 8 * v), dim=1)
    probs = classifier.predict_proba(X)
    np.testing.assert_allclose(probs, expected.numpy(), rtol=1e-8)
    np.testing.assert_allclose(classifier.predict_log_proba(X), np.log(probs))
    np.testing.assert_array_equal(classifier.predict(X), classifier.classes_[probs.argmax(1)])
    assert list(classifier.classes_) == ["bird", "cat", "dog"]


def test_fitted_attributes(regressor, classifier):
    for est in (regressor, classifier):
        la = est.model_.laplace
        assert est.log_marginal_likelihood_ == pytest.approx(
            la.log_marginal_likelihood().item(), rel=1e-12)
        np.testing.assert_allclose(est.prior_precision_, la.prior_precision.numpy())
        assert est.prior_precision_.shape == (4,)  # 2 layers x (weight, bias)
        assert est.n_features_in_ == (3 if est is regressor else 2)
        assert est.training_["evidence_epochs"] == [20, 40]
    X, y = regression_data()
    assert regressor.score(X, y) > 0.9  # R²


# ---- reproducibility, pickle, bad hyperparameters ---------------------------------------------
def test_reproducible_with_random_state_and_global_rng_untouched(regressor):
    X, y = regression_data()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    again = LaplaceRegressor(**SMALL, random_state=0).fit(X, y)
    assert torch.equal(torch.random.get_rng_state(), before)
    np.testing.assert_array_equal(again.predict(X), regressor.predict(X))
    other = LaplaceRegressor(**SMALL, random_state=1).fit(X, y)
    assert np.abs(other.predict(X) - regressor.predict(X)).max() > 1e-3


def test_pickle_round_trip(regressor, classifier):
    X, _ = regression_data(10, seed=3)
    loaded = pickle.loads(pickle.dumps(regressor))
    for noise in (True, False):
        a, b = loaded.predict(X, return_std=True, noise=noise), regressor.predict(
            X, return_std=True, noise=noise)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert loaded.log_marginal_likelihood_ == regressor.log_marginal_likelihood_
    Xc, _ = classification_data(10, seed=3)
    loaded = pickle.loads(pickle.dumps(classifier))
    np.testing.assert_array_equal(loaded.predict_proba(Xc), classifier.predict_proba(Xc))


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"lr": -1.0}, "lr must be a finite number > 0"),
        ({"lr": float("nan")}, "lr must be"),
        ({"epochs": 0}, "epochs must be an integer of at least 1"),
        ({"evidence_every": 2.5}, "evidence_every must be an integer"),
        ({"hidden_layer_sizes": (0,)}, "hidden widths must be positive integers"),
        ({"hidden_layer_sizes": ()}, "hidden widths must be positive integers"),
    ],
)
def test_bad_hyperparameters_raise_value_error_at_fit(params, fragment):
    X, y = regression_data(20)
    est = LaplaceRegressor(**{**SMALL, **params})  # __init__ never validates (sklearn rule)
    with pytest.raises(ValueError, match=fragment):
        est.fit(X, y)


def test_single_class_is_a_clear_error():
    X, _ = classification_data(20)
    with pytest.raises(ValueError, match="single class"):
        LaplaceClassifier(**SMALL).fit(X, np.full(20, "cat"))


# ---- scikit-learn tools -----------------------------------------------------------------------
def test_pipeline_with_column_transformer_on_mixed_columns():
    rng = np.random.default_rng(4)
    n = 80
    colour = rng.choice(["red", "green", "blue"], size=n)
    size = rng.normal(size=n)
    y = np.where(colour == "red", 3.0, 0.0) + size + 0.1 * rng.normal(size=n)
    X = np.empty((n, 2), dtype=object)
    X[:, 0], X[:, 1] = colour, size
    pre = ColumnTransformer([("cat", OneHotEncoder(), [0]), ("num", StandardScaler(), [1])])
    pipe = make_pipeline(pre, LaplaceRegressor(**SMALL, random_state=0)).fit(X, y)
    assert pipe[-1].n_features_in_ == 4  # 3 one-hot columns + 1 numeric
    assert pipe.score(X, y) > 0.9
    mean, std = pipe.predict(X[:5], return_std=True)  # predict params pass through Pipeline
    assert mean.shape == std.shape == (5,) and (std > 0).all()


def test_cross_val_score_and_grid_search():
    X, y = classification_data(90)
    est = LaplaceClassifier(**{**SMALL, "epochs": 150, "evidence_every": 50}, random_state=0)
    scores = cross_val_score(est, X, y, cv=3)
    majority = max(np.mean(y == c) for c in np.unique(y))
    assert scores.shape == (3,) and scores.mean() > majority + 0.2
    grid = GridSearchCV(
        LaplaceClassifier(**SMALL, random_state=0),
        {"hidden_layer_sizes": [(4,), (8,)]},
        cv=2,
    ).fit(X, y)
    assert grid.best_params_["hidden_layer_sizes"] in [(4,), (8,)]
    assert grid.best_estimator_.predict_proba(X).shape == (90, 3)


def test_exported_from_marglik_and_applications():
    assert marglik.LaplaceRegressor is LaplaceRegressor is tabular.LaplaceRegressor
    assert marglik.LaplaceClassifier is LaplaceClassifier
