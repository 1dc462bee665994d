"""A hyperparameter-free Bayesian MLP for numeric tables, and its on-disk model folder.

:func:`fit_table` standardises the inputs (and, for regression, the target), then trains a tanh
MLP by online evidence maximisation (:func:`marglik.training.marglik_training`, Immer et al., ICML
2021, Algorithm 1): Adam on the MAP objective with the current layer-wise prior precision δ (and
noise σ); every ``evidence_every`` epochs an all-weights KFAC Laplace posterior is fitted and δ
(and σ) take 50 Adam steps on its log marginal likelihood; the state with the highest evidence is
kept. Nothing is set by hand but the architecture and the training budget.

A model folder (:meth:`TabularModel.save`, :meth:`TabularModel.load`) holds, all loadable with
``torch.load(..., weights_only=True)``:

- ``config.json`` — format tag, task, feature and target names, classes, architecture;
- ``model.pt`` — the network's ``state_dict``;
- ``laplace.pt`` — :meth:`marglik.Laplace.state_dict` (posterior and tuned hyperparameters);
- ``standardizer.pt`` — ``{"x": ..., "y": ...}`` (``"y"`` for regression only), each the
  state of a :class:`marglik.data.Standardizer`;
- ``report.json`` — training metrics, log evidence and hyperparameters per round.

Predictions (:meth:`TabularModel.predict`) use the GLM (linearised) predictive: class
probabilities by the probit link, regression means and standard deviations in closed form, in the
target's original units; ``docs/calibration.md`` has the measurements behind these choices.

:class:`LaplaceRegressor` and :class:`LaplaceClassifier`
(:mod:`~marglik.applications.tabular.estimators`) are the same model as scikit-learn
estimators; they are imported on first use, so that scikit-learn is needed only for them.

Bad input (a table the model cannot be trained on, a folder that is not a model, a feature file
that does not match) raises :class:`marglik.errors.MarglikError` with a one-line message.
"""

from typing import Any

from marglik.applications.tabular.features import read_features
from marglik.applications.tabular.fit import (
    BATCH_SIZE,
    FULL_BATCH_MAX,
    check_budget,
    check_table,
    default_budget,
    fit_table,
    train_table,
)
from marglik.applications.tabular.model import (
    FILES,
    FORMAT,
    TabularModel,
    TabularPrediction,
    build_network,
)

__all__ = [
    "BATCH_SIZE",
    "FILES",
    "FORMAT",
    "FULL_BATCH_MAX",
    "TabularModel",
    "TabularPrediction",
    "build_network",
    "check_budget",
    "check_table",
    "default_budget",
    "fit_table",
    "read_features",
    "train_table",
]

_ESTIMATORS = ("LaplaceClassifier", "LaplaceRegressor")


def __getattr__(name: str) -> Any:
    """The scikit-learn estimators, imported on first use (scikit-learn is optional)."""
    if name in _ESTIMATORS:
        from marglik.applications.tabular import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
