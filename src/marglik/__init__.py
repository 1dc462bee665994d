"""marglik: Laplace approximations and marginal-likelihood model selection for PyTorch."""

from marglik import likelihoods
from marglik.posterior import FunctionalLaplace, Laplace, Posterior, Prior
from marglik.training import marglik_training, select_architecture

__version__ = "0.1.0"
__all__ = ["FunctionalLaplace", "Laplace", "LaplaceClassifier", "LaplaceRegressor", "Posterior",
           "Prior", "likelihoods", "marglik_training", "select_architecture"]

_ESTIMATORS = ("LaplaceClassifier", "LaplaceRegressor")


def __getattr__(name: str):
    """The scikit-learn estimators, imported on first use (scikit-learn is optional)."""
    if name in _ESTIMATORS:
        from marglik.applications.tabular import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module 'marglik' has no attribute {name!r}")
