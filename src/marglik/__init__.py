"""marglik: Laplace approximations and marginal-likelihood model selection for PyTorch."""

from marglik import likelihoods
from marglik.posterior import FunctionalLaplace, Laplace, Posterior, Prior
from marglik.training import marglik_training, select_architecture

__version__ = "0.1.0"
__all__ = ["FunctionalLaplace", "Laplace", "Posterior", "Prior", "likelihoods", "marglik_training",
           "select_architecture"]
