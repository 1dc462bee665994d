"""The evidence (marginal likelihood) and its maximisation over hyperparameters.

- :mod:`~marglik.evidence.laplace`: the Laplace evidence formula;
- :mod:`~marglik.evidence.optimize`: one hyperparameter step (Adam in log space on δ, σ and
  registered hyperparameters), shared by post-hoc (:func:`optimize_hyperparameters`,
  ``Laplace.optimize_prior_precision``) and online (:func:`marglik.marglik_training`)
  optimisation.

Other evidence estimates plug in here as functions of a
:class:`~marglik.posterior.base.Posterior`: :mod:`~marglik.evidence.bounds` holds the
data-, output- and parameter-partitioned lower bounds and their stochastic estimates (Immer et
al., ICML 2023); the
function-space form of the evidence itself is the ``"kernel"`` structure.
"""

from marglik.evidence.bounds import (
    KernelBound,
    PartitionedEvidence,
    class_partitions,
    random_partitions,
)
from marglik.evidence.laplace import laplace_log_evidence
from marglik.evidence.optimize import HyperparameterStep, optimize_hyperparameters

__all__ = ["HyperparameterStep", "KernelBound", "PartitionedEvidence", "class_partitions",
           "laplace_log_evidence", "optimize_hyperparameters", "random_partitions"]
