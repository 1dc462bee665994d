"""Training: MAP training with a Gaussian prior, and online evidence maximisation.

- :mod:`~marglik.training.map`: Adam on the negative log joint, δ scalar / per tensor / per entry;
- :mod:`~marglik.training.online`: :func:`marglik_training`, θ and hyperparameters jointly by the
  Laplace evidence (Immer et al., ICML 2021, Algorithm 1);
- :mod:`~marglik.training.selection`: :func:`select_architecture` by the converged evidence;
- :mod:`~marglik.training.stopping`: :class:`EvidencePlateau`, end training once the evidence
  has levelled off (``marglik_training(stop=...)``).
"""

from marglik.training.map import map_loss, prior_term, train_map
from marglik.training.online import marglik_training
from marglik.training.selection import select_architecture
from marglik.training.stopping import EvidencePlateau

__all__ = ["EvidencePlateau", "map_loss", "marglik_training", "prior_term", "select_architecture",
           "train_map"]
