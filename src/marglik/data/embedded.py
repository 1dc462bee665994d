"""Small data sets that ship with scikit-learn, so they load offline.

scikit-learn is imported lazily (``pip install marglik[data]``). Splits are drawn with a seeded
:class:`torch.Generator`, so they are reproducible across runs and machines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from marglik.data.standardize import Standardizer

__all__ = ["RegressionSplit", "load_digits_split", "load_regression_set", "REGRESSION_SETS"]

#: Names accepted by :func:`load_regression_set`.
REGRESSION_SETS = ("diabetes",)


def _sklearn_datasets():
    try:
        from sklearn import datasets
    except ImportError as e:
        raise ImportError(
            "marglik.data's bundled data sets need scikit-learn, which is not installed: "
            "pip install marglik[data]"
        ) from e
    return datasets


def _permutation(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)


def load_digits_split(
    test_size: int = 540,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    flatten: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 8x8 handwritten digits (1797 images, 10 classes) with a random train/test split.

    Pixel values (0..16) are scaled to ``[0, 1]``.

    Args:
        test_size: Number of test images (default 540, leaving 1257 for training).
        seed: Seed of the split.
        dtype: Floating dtype of the images.
        flatten: Return images as ``(N, 64)`` instead of ``(N, 1, 8, 8)``.

    Returns:
        ``(X_train, y_train, X_test, y_test)``: images of shape ``(N, 1, 8, 8)`` (or ``(N, 64)``)
        and int64 labels of shape ``(N,)``.
    """
    digits = _sklearn_datasets().load_digits()
    X = torch.as_tensor(digits.data, dtype=dtype) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    n = X.shape[0]
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be between 1 and {n - 1}, got {test_size}")
    if not flatten:
        X = X.reshape(n, 1, 8, 8)
    perm = _permutation(n, seed)
    test, train = perm[:test_size], perm[test_size:]
    return X[train], y[train], X[test], y[test]


@dataclass
class RegressionSplit:
    """A standardised regression train/test split.

    Features and targets are standardised with the training split's mean and (population)
    standard deviation. To report results in original units: ``y = y_std * y_s + y_mean``,
    RMSE scales by ``y_std``, and a per-point Gaussian log-likelihood shifts by ``-log(y_std)``.

    Attributes:
        X_train: ``(N_train, D)`` standardised features.
        y_train: ``(N_train, 1)`` standardised targets.
        X_test: ``(N_test, D)`` features standardised with the training statistics.
        y_test: ``(N_test, 1)`` targets standardised with the training statistics.
        x_mean: ``(D,)`` training feature means.
        x_std: ``(D,)`` training feature standard deviations (0 replaced by 1).
        y_mean: 0-dim training target mean.
        y_std: 0-dim training target standard deviation.
        name: Data set name.
    """

    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    x_mean: Tensor
    x_std: Tensor
    y_mean: Tensor
    y_std: Tensor
    name: str = ""


def standardized_split(
    X: Tensor, y: Tensor, train_idx: Tensor, test_idx: Tensor, name: str = ""
) -> RegressionSplit:
    """Split ``X`` (N, D) and ``y`` (N,) by index and standardise with training statistics."""
    x_scaler = Standardizer().fit(X[train_idx])
    y_scaler = Standardizer().fit(y[train_idx])
    assert x_scaler.mean is not None and x_scaler.std is not None
    assert y_scaler.mean is not None and y_scaler.std is not None
    return RegressionSplit(
        X_train=x_scaler.transform(X[train_idx]),
        y_train=y_scaler.transform(y[train_idx]).reshape(-1, 1),
        X_test=x_scaler.transform(X[test_idx]),
        y_test=y_scaler.transform(y[test_idx]).reshape(-1, 1),
        x_mean=x_scaler.mean,
        x_std=x_scaler.std,
        y_mean=y_scaler.mean,
        y_std=y_scaler.std,
        name=name,
    )


def load_regression_set(
    name: str = "diabetes",
    seed: int = 0,
    test_fraction: float = 0.3,
    dtype: torch.dtype = torch.float32,
) -> RegressionSplit:
    """A bundled scikit-learn regression set with a random, standardised train/test split.

    Available: ``"diabetes"`` (442 patients, 10 raw features, disease progression target).

    Args:
        name: Data set name, one of :data:`REGRESSION_SETS`.
        seed: Seed of the split.
        test_fraction: Fraction of rows in the test split, in ``(0, 1)``; the test size is
            ``round(test_fraction * N)``.
        dtype: Floating dtype of the tensors.

    Returns:
        A :class:`RegressionSplit` (targets of shape ``(N, 1)``, statistics included).
    """
    if name not in REGRESSION_SETS:
        raise ValueError(f"unknown regression set {name!r}; available: {list(REGRESSION_SETS)}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    ds = _sklearn_datasets()
    raw = ds.load_diabetes(scaled=False)
    X = torch.as_tensor(raw.data, dtype=dtype)
    y = torch.as_tensor(raw.target, dtype=dtype)
    n = X.shape[0]
    n_test = round(test_fraction * n)
    if not 0 < n_test < n:
        raise ValueError(f"test_fraction {test_fraction} leaves an empty split for N = {n}")
    perm = _permutation(n, seed)
    return standardized_split(X, y, perm[n_test:], perm[:n_test], name=name)
