"""scikit-learn estimators for Laplace neural additive models (LA-NAM, Bouchiat et al., AABI 2023).

:class:`LaplaceAdditiveRegressor` (Gaussian or heteroscedastic) and
:class:`LaplaceAdditiveClassifier` (binary) wrap :func:`~marglik.applications.additive.fit_additive`
(and :func:`~marglik.applications.additive.fit_interactions` when ``n_interactions > 0``):
inputs are standardised per feature (regression targets too) with training statistics, the model
is fitted in those units, and predictions, shape functions and bands are returned in the
original units. ``feature_importances_`` are the learned prior variances of the feature
subnetworks, 1/δ_d, normalised to sum to one (a switched-off feature has a large δ_d).
Needs scikit-learn.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from marglik.applications.additive.fit import AdditiveFit, fit_additive, fit_interactions
from marglik.applications.additive.shapes import feature_grid, shape_functions
from marglik.applications.heteroscedastic import heteroscedastic_predictive

__all__ = ["LaplaceAdditiveClassifier", "LaplaceAdditiveRegressor"]

_DTYPE = torch.float32


class _AdditiveBase(BaseEstimator):
    """Shared fitting and shape-function code; subclasses set the likelihood."""

    def __init__(self, hidden=(64,), activation="relu", n_epochs=300, lr=1e-2,
                 batch_size=512, n_interactions=0, n_epochs_interactions=None,
                 hessian_structure="kron", n_epochs_burnin=20, marglik_frequency=20,
                 n_hypersteps=50, lr_hyp=0.1, random_state=None, patience=None,
                 min_delta=1.0):
        self.hidden = hidden
        self.activation = activation
        self.n_epochs = n_epochs
        self.lr = lr
        self.batch_size = batch_size
        self.n_interactions = n_interactions
        self.n_epochs_interactions = n_epochs_interactions
        self.hessian_structure = hessian_structure
        self.n_epochs_burnin = n_epochs_burnin
        self.marglik_frequency = marglik_frequency
        self.n_hypersteps = n_hypersteps
        self.lr_hyp = lr_hyp
        self.random_state = random_state
        self.patience = patience
        self.min_delta = min_delta

    def _check_params(self) -> None:
        for name in ("n_epochs", "n_hypersteps", "marglik_frequency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "lr_hyp"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        k = self.n_interactions
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"n_interactions must be a non-negative integer, got {k!r}")

    def _fit(self, X: np.ndarray, y: np.ndarray, likelihood: str) -> None:
        self._check_params()
        self.x_mean_ = X.mean(0)
        std = X.std(0)
        self.x_std_ = np.where(std > 0, std, 1.0)
        seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        Xt = self._x(X)
        yt = torch.as_tensor(y, dtype=_DTYPE)
        k_max = X.shape[1] * (X.shape[1] - 1) // 2
        if self.n_interactions > k_max:
            raise ValueError(f"n_interactions must be at most {k_max} for {X.shape[1]} features, "
                             f"got {self.n_interactions}")
        fit = fit_additive(
            Xt, yt, likelihood, hidden=tuple(self.hidden), activation=self.activation,
            n_epochs=int(self.n_epochs), lr=float(self.lr), batch_size=self.batch_size,
            hessian_structure=self.hessian_structure, n_epochs_burnin=int(self.n_epochs_burnin),
            marglik_frequency=int(self.marglik_frequency), n_hypersteps=int(self.n_hypersteps),
            lr_hyp=float(self.lr_hyp), seed=seed,
            patience=int(self.patience) if isinstance(self.patience, np.integer)
            else self.patience, min_delta=self.min_delta)
        self.stage1_ = fit
        if self.n_interactions > 0:
            fit = fit_interactions(fit, Xt, yt, int(self.n_interactions),
                                   self.n_epochs_interactions, seed)
        self.fit_: AdditiveFit = fit
        self.interaction_pairs_ = list(fit.model.pairs)
        self.prior_precisions_ = fit.precisions.numpy().astype(float)
        variance = 1.0 / fit.feature_precisions.double().numpy()
        self.feature_importances_ = variance / variance.sum()
        self.log_marginal_likelihood_ = float(fit.la.log_marginal_likelihood().detach())
        self.fit_seconds_ = fit.seconds + fit.options.get("stage1_seconds", 0.0)

    def _x(self, X: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((X - self.x_mean_) / self.x_std_, dtype=_DTYPE)

    def _output_scale(self) -> float:
        return 1.0

    def shape_functions(self, n_points: int = 100, X=None) -> dict[str, np.ndarray]:
        """Centred feature shape functions with credible bands, in original units.

        Args:
            n_points: grid points per feature (over the training range of each feature).
            X: inputs to centre on (default: the training inputs' range and mean are used:
                the functions are centred on the training data).

        Returns:
            ``{"grid": (M, D), "mean": (M, D, C), "std": (M, D, C)}``: feature values, the
            function mean f̃_d and its posterior standard deviation (sqrt of J_d Σ_dd J_dᵀ),
            in target units for Gaussian regression (standardised target × y scale), logits
            for classification, natural parameters for heteroscedastic regression.
        """
        check_is_fitted(self, "fit_")
        ref = self._train_x_ if X is None else self._x(validate_data(self, X, reset=False))
        sf = shape_functions(self.fit_.la, self.fit_.model, ref, grid=feature_grid(ref, n_points))
        scale = self._output_scale()
        grid = sf.grid.double().numpy() * self.x_std_ + self.x_mean_
        return {"grid": grid, "mean": sf.mean.double().numpy() * scale,
                "std": sf.std.double().numpy() * scale}


class LaplaceAdditiveRegressor(RegressorMixin, _AdditiveBase):
    """LA-NAM regressor: per-feature MLPs, per-subnetwork prior precisions by the evidence.

    Args:
        hidden, activation: widths and activation of each feature subnetwork.
        n_epochs, lr, batch_size: Adam on the weights (stage 1).
        n_interactions: k pair subnetworks added in stage 2 (0: none).
        n_epochs_interactions: epochs of stage 2 (default ``n_epochs``).
        heteroscedastic: natural-parameter Gaussian likelihood (input-dependent noise).
        hessian_structure: ``"kron"`` (default, as the paper), ``"full"`` or ``"diag"``.
        n_epochs_burnin, marglik_frequency, n_hypersteps, lr_hyp: the evidence updates.
        random_state: seed (int), ``RandomState`` or None.
        patience, min_delta: stage 1 ends once the training log evidence has not risen by
            ``min_delta`` nats in ``patience`` evidence updates (``n_epochs`` is then the
            maximum; :func:`~marglik.applications.additive.fit_additive`); None: all epochs.

    Attributes (after fit):
        feature_importances_ (D,), prior_precisions_ (D + K,), interaction_pairs_,
        log_marginal_likelihood_ (standardised units), fit_seconds_, fit_ (the
        :class:`~marglik.applications.additive.AdditiveFit`).
    """

    def __init__(self, hidden=(64,), activation="relu", n_epochs=300, lr=1e-2,
                 batch_size=512, n_interactions=0, n_epochs_interactions=None,
                 heteroscedastic=False, hessian_structure="kron", n_epochs_burnin=20,
                 marglik_frequency=20, n_hypersteps=50, lr_hyp=0.1, random_state=None,
                 patience=None, min_delta=1.0):
        super().__init__(hidden, activation, n_epochs, lr, batch_size, n_interactions,
                         n_epochs_interactions, hessian_structure, n_epochs_burnin,
                         marglik_frequency, n_hypersteps, lr_hyp, random_state, patience,
                         min_delta)
        self.heteroscedastic = heteroscedastic

    def fit(self, X, y) -> LaplaceAdditiveRegressor:
        """Fit on X (N, D) and real targets y (N,)."""
        X, y = validate_data(self, X, y, y_numeric=True, dtype=np.float64)
        if len(X) < 2:
            raise ValueError(f"need at least 2 samples, got {len(X)}")
        self.y_mean_ = float(y.mean())
        self.y_std_ = float(y.std()) if y.std() > 0 else 1.0
        self._fit(X, (y - self.y_mean_) / self.y_std_,
                  "heteroscedastic" if self.heteroscedastic else "regression")
        self._train_x_ = self._x(X)
        return self

    def _output_scale(self) -> float:
        return 1.0 if self.heteroscedastic else self.y_std_

    def predict(self, X, return_std: bool = False):
        """Predictive mean (N,), and with ``return_std`` the predictive standard deviation
        (N,): sqrt(epistemic variance of the linearised model + noise variance σ² or σ²(x))."""
        check_is_fitted(self, "fit_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        x, la = self._x(X), self.fit_.la
        if self.heteroscedastic:
            p = heteroscedastic_predictive(la, x, self.y_mean_, self.y_std_)
            mean, var = p.mean, p.predictive_var
        else:
            f_mean, f_var = la(x)
            mean = self.y_mean_ + self.y_std_ * f_mean[:, 0]
            var = self.y_std_**2 * (f_var[:, 0, 0] + la.sigma_noise.reshape(-1)[0] ** 2)
        mean = mean.detach().double().numpy()
        return (mean, var.detach().double().sqrt().numpy()) if return_std else mean

    def log_likelihood(self, X, y) -> float:
        """Mean Gaussian predictive log density of y (N,) in original units."""
        mean, std = self.predict(X, return_std=True)
        y = np.asarray(y, dtype=float).reshape(-1)
        return float(np.mean(-0.5 * np.log(2 * np.pi * std**2) - 0.5 * ((y - mean) / std) ** 2))


class LaplaceAdditiveClassifier(ClassifierMixin, _AdditiveBase):
    """LA-NAM binary classifier (Bernoulli likelihood, probit-approximated GLM predictive).

    Same arguments and attributes as :class:`LaplaceAdditiveRegressor` (no
    ``heteroscedastic``); ``classes_`` holds the two labels.
    """

    def fit(self, X, y) -> LaplaceAdditiveClassifier:
        """Fit on X (N, D) and labels y (N,) with exactly two classes."""
        X, y = validate_data(self, X, y, dtype=np.float64)
        kind = type_of_target(y)
        if kind not in ("binary",):
            raise ValueError(f"LaplaceAdditiveClassifier needs binary labels (two classes), got "
                             f"a target of type {kind!r}")
        self.classes_, y_index = np.unique(y, return_inverse=True)
        self._fit(X, y_index.astype(np.float64), "binary")
        self._train_x_ = self._x(X)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (N, 2) from the probit approximation of the GLM predictive."""
        check_is_fitted(self, "fit_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        p1 = self.fit_.la(self._x(X), link_approx="probit")[:, 0].detach().double().numpy()
        return np.stack([1 - p1, p1], axis=1)

    def predict(self, X) -> np.ndarray:
        """The more probable class of each row (N,)."""
        return self.classes_[(self.predict_proba(X)[:, 1] > 0.5).astype(int)]
