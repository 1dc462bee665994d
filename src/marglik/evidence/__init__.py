"""The evidence (marginal likelihood) and its maximisation over hyperparameters.

- :mod:`~marglik.evidence.laplace`: the Laplace evidence formula;
- :mod:`~marglik.evidence.optimize`: one hyperparameter step (Adam in log space on δ, σ and
  registered hyperparameters), shared by post-hoc (:func:`optimize_hyperparameters`,
  ``Laplace.optimize_prior_precision``) and online (:func:`marglik.marglik_training`)
  optimisation.

Other evidence estimates plug in here as functions of a
:class:`~marglik.posterior.base.Posterior`: the function-space (kernel) form of the linearised
Laplace evidence and its stochastic lower bounds (Immer et al., ICML 2023) go in modules of their
own beside ``laplace.py`` and are optimised with the same :class:`HyperparameterStep`.
"""

from marglik.evidence.laplace import laplace_log_evidence
from marglik.evidence.optimize import HyperparameterStep, optimize_hyperparameters

__all__ = ["HyperparameterStep", "laplace_log_evidence", "optimize_hyperparameters"]
