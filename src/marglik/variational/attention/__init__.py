"""Dirichlet attention (Cinquin, Immer, Horn & Fortuin, AABI 2022; arXiv 2110.04020).

Variational inference on the attention weights instead of the network weights: each attention
row is a Dirichlet random variable whose concentration comes from the attention logits, sampled
with implicit reparameterisation gradients, with a Dirichlet prior and a KL term in the ELBO;
prediction averages over attention samples. See ``docs/dirichlet-attention.md``.

- :mod:`~.dirichlet` — the concentration link, masked sampling by normalised Gammas, masked KL.
- :mod:`~.layer` — multi-head self-attention with softmax or Dirichlet rows, padding / causal masks.
- :mod:`~.transformer` — a small transformer classifier taking an attention factory.
- :mod:`~.elbo` — the ELBO (per data point) and the Monte Carlo predictive (also MC dropout).
"""

from marglik.variational.attention.dirichlet import (
    concentration,
    dirichlet_kl,
    masked_mean,
    masked_rsample,
)
from marglik.variational.attention.elbo import attention_kl, elbo, mc_sampling, predict_mc
from marglik.variational.attention.layer import (
    DirichletAttention,
    SelfAttention,
    SoftmaxAttention,
    allowed_keys,
)
from marglik.variational.attention.transformer import (
    TransformerClassifier,
    dirichlet_attention,
    softmax_attention,
)

__all__ = [
    "DirichletAttention",
    "SelfAttention",
    "SoftmaxAttention",
    "TransformerClassifier",
    "allowed_keys",
    "attention_kl",
    "concentration",
    "dirichlet_attention",
    "dirichlet_kl",
    "elbo",
    "masked_mean",
    "masked_rsample",
    "mc_sampling",
    "predict_mc",
    "softmax_attention",
]
