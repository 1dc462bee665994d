"""Input validation and target encoding for the scikit-learn estimators.

Small functions any marglik estimator can import (the MLP estimators of
:mod:`marglik.applications.tabular.estimators`, and an additive-model estimator): they check
``X`` and ``y`` the way scikit-learn's own estimators do (``sklearn.utils.validation``: NaN / inf,
sparse, complex and object input, 1-d ``X``, too few samples, the number and names of features
seen in ``fit``), turn targets into what :class:`marglik.data.Table` holds, and build the
table. Errors are ``ValueError`` / ``TypeError`` with scikit-learn's messages.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from marglik.data import Table

__all__ = [
    "check_fit_data",
    "check_predict_data",
    "encode_classes",
    "feature_names",
    "make_table",
    "regression_target",
]


def check_fit_data(
    estimator: BaseEstimator, X: Any, y: Any, *, classification: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(X, y)`` for ``fit``: X float (N, D) with N ≥ 2, finite; y (N,).

    Sets ``n_features_in_`` (and ``feature_names_in_`` for a DataFrame) on ``estimator``.
    A regression target must be numeric and finite; a column vector y (N, 1) is flattened with
    scikit-learn's ``DataConversionWarning``.
    """
    X, y = validate_data(
        estimator,
        X,
        y,
        dtype=[np.float64, np.float32],
        ensure_min_samples=2,
        y_numeric=not classification,
    )
    return X, y


def check_predict_data(estimator: BaseEstimator, X: Any) -> Tensor:
    """Validated ``X`` for ``predict``, as a float64 tensor (N, D).

    Raises ``NotFittedError`` before ``fit`` and ``ValueError`` when the number (or the names)
    of the features differ from those seen in ``fit``.
    """
    check_is_fitted(estimator)
    X = validate_data(estimator, X, dtype=[np.float64, np.float32], reset=False)
    return torch.tensor(np.asarray(X, dtype=np.float64))


def encode_classes(y: np.ndarray) -> tuple[np.ndarray, Tensor]:
    """``(classes_, indices)``: the sorted labels and each row's class index, int64 (N,).

    Raises ``ValueError`` ("Unknown label type") for a continuous target, as scikit-learn's
    classifiers do.
    """
    check_classification_targets(y)
    classes, indices = np.unique(y, return_inverse=True)
    return classes, torch.as_tensor(indices.reshape(-1), dtype=torch.long)


def regression_target(y: np.ndarray) -> Tensor:
    """A numeric target as float64 (N, 1)."""
    return torch.tensor(np.asarray(y, dtype=np.float64).reshape(-1, 1))


def feature_names(estimator: BaseEstimator) -> list[str]:
    """``feature_names_in_`` when ``fit`` saw a DataFrame, else ``x0 … x{D-1}``."""
    names = getattr(estimator, "feature_names_in_", None)
    if names is not None:
        return [str(n) for n in names]
    return [f"x{j}" for j in range(estimator.n_features_in_)]


def make_table(
    estimator: BaseEstimator, X: np.ndarray, y: Tensor, classes: np.ndarray | None
) -> Table:
    """The :class:`marglik.data.Table` (X float64) of validated data (``y`` from
    :func:`encode_classes` or :func:`regression_target`); class labels become plain Python
    values for the model config."""
    return Table(
        X=torch.tensor(np.asarray(X, dtype=np.float64)),
        y=y,
        feature_names=feature_names(estimator),
        target_name="y",
        task="regression" if classes is None else "classification",
        classes=None if classes is None else classes.tolist(),
    )
