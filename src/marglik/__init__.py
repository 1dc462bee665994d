"""marglik: Laplace approximations and marginal-likelihood model selection for PyTorch."""

from marglik import likelihoods
from marglik.posterior import FunctionalLaplace, Laplace, Posterior, Prior
from marglik.training import marglik_training, select_architecture

__version__ = "0.1.0"
__all__ = ["FunctionalLaplace", "Laplace", "LaplaceAdditiveClassifier",
           "LaplaceAdditiveRegressor", "LaplaceClassifier", "LaplaceRegressor", "Posterior",
           "Prior", "likelihoods", "marglik_training", "select_architecture"]

#: the scikit-learn estimators and their modules, imported on first use (scikit-learn is optional)
_ESTIMATORS = {
    "LaplaceClassifier": "marglik.applications.tabular.estimators",
    "LaplaceRegressor": "marglik.applications.tabular.estimators",
    "LaplaceAdditiveClassifier": "marglik.applications.additive.estimators",
    "LaplaceAdditiveRegressor": "marglik.applications.additive.estimators",
}


def __getattr__(name: str):
    """The scikit-learn estimators, imported on first use (scikit-learn is optional)."""
    if name in _ESTIMATORS:
        import importlib

        return getattr(importlib.import_module(_ESTIMATORS[name]), name)
    raise AttributeError(f"module 'marglik' has no attribute {name!r}")
