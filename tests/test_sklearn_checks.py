"""scikit-learn's own estimator checks (``check_estimator``) on the Laplace estimators.

Small training budgets keep the ~50 fits per estimator fast. No check is expected to fail
(``EXPECTED_FAILED_CHECKS`` is empty). Checks scikit-learn does not generate or skips here: the
sample-weight checks (``fit`` takes no ``sample_weight``: the evidence of a weighted likelihood
is not defined), the array-API checks (the network runs in torch on numpy input) and the pandas
checks where pandas is not installed.
"""

import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

from marglik.applications.tabular.estimators import (
    EXPECTED_FAILED_CHECKS,
    LaplaceClassifier,
    LaplaceRegressor,
)

torch.set_num_threads(1)

SMALL = {"hidden_layer_sizes": (16,), "epochs": 40, "evidence_every": 20, "lr": 0.03}


@parametrize_with_checks(
    [LaplaceRegressor(**SMALL), LaplaceClassifier(**SMALL)],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS,
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
