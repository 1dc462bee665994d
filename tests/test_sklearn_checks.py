"""scikit-learn's own estimator checks (``check_estimator``) on the Laplace estimators.

Small training budgets keep the ~50 fits per estimator fast. No check is expected to fail
(``EXPECTED_FAILED_CHECKS`` is empty). Checks scikit-learn does not generate or skips here: the
sample-weight checks (``fit`` takes no ``sample_weight``: the evidence of a weighted likelihood
is not defined), the array-API checks (the network runs in torch on numpy input) and the pandas
checks where pandas is not installed. Every generated check asserts inside and raises on a
failure; the last test pins which checks run and that none is excused.
"""

import functools

import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

from marglik.applications.tabular.estimators import (
    EXPECTED_FAILED_CHECKS,
    LaplaceClassifier,
    LaplaceRegressor,
)

torch.set_num_threads(1)

SMALL = {"hidden_layer_sizes": (16,), "epochs": 40, "evidence_every": 20, "lr": 0.03}


CHECKS = parametrize_with_checks(
    [LaplaceRegressor(**SMALL), LaplaceClassifier(**SMALL)],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS,
)


@CHECKS
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


def test_the_core_checks_run_for_both_estimators_and_none_is_excused():
    names: dict[str, set[str]] = {}
    for param in CHECKS.args[1]:
        estimator, check = getattr(param, "values", param)  # pytest.param or a plain pair
        func = check.func if isinstance(check, functools.partial) else check
        names.setdefault(type(estimator).__name__, set()).add(func.__name__)
    core = {"check_fit_idempotent", "check_estimators_pickle", "check_n_features_in",
            "check_methods_subset_invariance", "check_methods_sample_order_invariance",
            "check_estimators_nan_inf", "check_fit_check_is_fitted", "check_supervised_y_2d"}
    assert set(names) == {"LaplaceRegressor", "LaplaceClassifier"}
    for kind, generated in names.items():
        assert core <= generated, (kind, core - generated)
    assert "check_classifiers_train" in names["LaplaceClassifier"]
    assert "check_regressors_train" in names["LaplaceRegressor"]
    assert EXPECTED_FAILED_CHECKS == {}
