"""scikit-learn estimators: an MLP trained by online evidence maximisation, Laplace predictive.

:class:`LaplaceRegressor` and :class:`LaplaceClassifier` wrap the recipe of ``marglik fit``
(:func:`marglik.applications.tabular.train_table`): features (and a regression target) are
standardised, a tanh MLP is trained by Adam on the MAP objective while its layer-wise prior
precision δ (and the noise σ) are tuned every ``evidence_every`` epochs by the Laplace evidence
of an all-weights KFAC posterior (Immer et al., "Scalable marginal likelihood estimation for
model selection in deep learning", ICML 2021, Algorithm 1); the state with the best evidence is
kept. Predictions use the linearised (GLM) predictive: for regression
``y* ~ N(f(x*), J Σ Jᵀ + σ²)`` in closed form, for classification the probit approximation
``softmax(f / sqrt(1 + π/8 · diag(J Σ Jᵀ)))``.

The network is trained and evaluated in float64 (scikit-learn's arrays are float64, and a
prediction then does not depend on which other rows share its batch beyond rounding at 1e-15,
which scikit-learn's checks require). There is nothing to tune by cross-validation but the
architecture and the training budget; the evidence itself is ``log_marginal_likelihood_``,
which can compare architectures on the training data alone.

scikit-learn's ``check_estimator`` passes with no expected failures; see
:data:`EXPECTED_FAILED_CHECKS` for the checks that do not apply.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state

from marglik.applications.tabular.fit import check_budget, train_table
from marglik.applications.tabular.inputs import (
    check_fit_data,
    check_predict_data,
    encode_classes,
    make_table,
    regression_target,
)
from marglik.applications.tabular.model import TabularModel

__all__ = ["EXPECTED_FAILED_CHECKS", "LaplaceClassifier", "LaplaceRegressor"]

#: scikit-learn checks expected to fail, with the reason (``expected_failed_checks`` of
#: ``check_estimator`` / ``parametrize_with_checks``): none. Checks scikit-learn does not run on
#: these estimators: the sample-weight checks (``fit`` takes no ``sample_weight``: the evidence
#: of a weighted likelihood is not defined) and the array-API checks (the network runs in torch
#: on numpy input); the pandas checks run where pandas is installed.
EXPECTED_FAILED_CHECKS: dict[str, str] = {}


class _LaplaceMLP(BaseEstimator):
    """Hyperparameters, fitting and pickling shared by the two estimators."""

    _classification: bool = False

    def __init__(
        self,
        hidden_layer_sizes: tuple[int, ...] = (50,),
        *,
        epochs: int | None = None,
        evidence_every: int | None = None,
        lr: float = 1e-2,
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.epochs = epochs
        self.evidence_every = evidence_every
        self.lr = lr
        self.random_state = random_state
        self.verbose = verbose

    def _fit(self, X: Any, y: Any) -> None:
        hidden = self.hidden_layer_sizes
        hidden = [hidden] if isinstance(hidden, (int, np.integer)) else hidden
        check_budget(hidden, self.epochs, self.evidence_every, self.lr)
        X, y = check_fit_data(self, X, y, classification=self._classification)
        if self._classification:
            self.classes_, target = encode_classes(y)
            table = make_table(self, X, target, self.classes_)
        else:
            table = make_table(self, X, regression_target(y), None)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        model, training = train_table(
            table,
            hidden,
            epochs=self.epochs,
            evidence_every=self.evidence_every,
            lr=float(self.lr),
            seed=seed,
            progress=bool(self.verbose),
            dtype=torch.float64,
        )
        la = model.laplace
        self.model_ = model
        self.log_marginal_likelihood_ = float(la.log_marginal_likelihood().item())
        self.prior_precision_ = la.prior_precision.detach().numpy().astype(np.float64)
        self.training_ = training

    # pickling: the fitted model as config and plain tensors (no torch objects with hooks)
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if isinstance(state.get("model_"), TabularModel):
            state = dict(state)
            state["model_"] = state["model_"].state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("model_"), dict):
            state = dict(state)
            state["model_"] = TabularModel.from_state(state["model_"])
        super().__setstate__(state)


class LaplaceRegressor(RegressorMixin, _LaplaceMLP):
    """MLP regressor with its prior precision and noise learned by the Laplace evidence.

    Args:
        hidden_layer_sizes: widths of the tanh hidden layers.
        epochs: training epochs; default 1000 full-batch Adam steps for up to 2048 rows, else
            100 epochs of mini-batches of 128.
        evidence_every: epochs between evidence updates of δ and σ (default ``epochs // 20``).
        lr: Adam learning rate of the weights.
        random_state: seed of the initial weights and mini-batch order (None: drawn from
            numpy's global random state); the global torch random state is not touched.
        verbose: show a tqdm progress bar on stderr.

    Attributes:
        model_: the :class:`~marglik.applications.tabular.TabularModel` (network, Laplace
            posterior, standardisers).
        log_marginal_likelihood_: log evidence of the kept state (standardised target units).
        prior_precision_: learned prior precision δ per parameter tensor, shape (2·layers,).
        sigma_noise_: learned noise standard deviation σ in the target's units.
        training_: the training summary (epochs, evidence per update, losses, seconds).
        n_features_in_, feature_names_in_: as in scikit-learn.

    Example:
        >>> reg = LaplaceRegressor((50,), random_state=0).fit(X, y)   # doctest: +SKIP
        >>> mean, std = reg.predict(X_test, return_std=True)          # doctest: +SKIP
    """

    _classification = False

    def fit(self, X: Any, y: Any) -> LaplaceRegressor:
        """Train on ``X`` (N, D) and ``y`` (N,); returns ``self``."""
        self._fit(X, y)
        sigma = self.model_.laplace.sigma_noise.reshape(()).item()
        self.sigma_noise_ = float(sigma * self.model_.y_scaler.std.reshape(()).item())
        return self

    def predict(
        self, X: Any, return_std: bool = False, *, noise: bool = True
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predictive mean (N,), and with ``return_std`` its standard deviation (N,).

        Both are in the target's original units. The std is that of the GLM predictive
        ``sqrt(J Σ Jᵀ + σ²)`` (the spread of a new observation) with ``noise=True``, the
        default, and the epistemic part ``sqrt(J Σ Jᵀ)`` (the spread of the regression function)
        with ``noise=False``.
        """
        X = check_predict_data(self, X)
        pred = self.model_.predict(X)
        mean = pred.mean.double().numpy()
        if not return_std:
            return mean
        std = pred.std_with_noise if noise else pred.std_without_noise
        return mean, std.double().numpy()


class LaplaceClassifier(ClassifierMixin, _LaplaceMLP):
    """MLP classifier with its prior precision learned by the Laplace evidence.

    Arguments as for :class:`LaplaceRegressor`. Class probabilities are the GLM predictive with
    the probit link; labels are their argmax.

    Attributes:
        classes_: the sorted class labels.
        model_, log_marginal_likelihood_, prior_precision_, training_, n_features_in_,
        feature_names_in_: as for :class:`LaplaceRegressor`.
    """

    _classification = True

    def fit(self, X: Any, y: Any) -> LaplaceClassifier:
        """Train on ``X`` (N, D) and labels ``y`` (N,); returns ``self``."""
        self._fit(X, y)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (N, C), columns in the order of ``classes_``."""
        X = check_predict_data(self, X)
        with torch.no_grad():
            probs = self.model_.predict(X).probs
        probs = probs.double().numpy()
        return probs / probs.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Log class probabilities (N, C)."""
        return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class label of each row (N,)."""
        probs = self.predict_proba(X)
        return self.classes_[np.argmax(probs, axis=1)]
