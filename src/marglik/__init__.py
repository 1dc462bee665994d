"""marglik: Laplace approximations and marginal-likelihood model selection for PyTorch."""

from marglik import likelihoods
from marglik.online import marglik_training, select_architecture
from marglik.posterior import Laplace

__version__ = "0.1.0"
__all__ = ["Laplace", "likelihoods", "marglik_training", "select_architecture"]
