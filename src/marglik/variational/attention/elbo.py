"""The ELBO of Dirichlet attention and the Monte Carlo predictive.

The attention rows A_n of a sequence are local latent variables with variational posterior
q(A_n | x_n) = Π_rows Dir(α(x_n)) and prior p(A_n) = Π_rows Dir(β·1) (Cinquin et al., AABI 2022,
arXiv 2110.04020). The ELBO is

    L = Σ_n E_q[log p(y_n | x_n, A_n)] − KL(q(A_n | x_n) ‖ p(A_n)),

and :func:`elbo` returns the one-sample estimate of L / N on a mini-batch: the batch mean of
log p(y_n | x_n, A_n) − w_KL · KL_n, an unbiased estimate of L / N for w_KL = 1 (the KL is per
sequence, so it is *not* divided by the dataset size, unlike a KL over global weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marglik.errors import MarglikError
from marglik.variational.attention.layer import DirichletAttention

__all__ = ["attention_kl", "elbo", "mc_sampling", "predict_mc"]


def attention_kl(model: nn.Module) -> Tensor:
    """Σ over the model's :class:`~.layer.DirichletAttention` modules of their last KL, ``(N,)``.

    Raises if the model has no Dirichlet attention or has not run a forward pass.
    """
    kls = [m.kl for m in model.modules() if isinstance(m, DirichletAttention)]
    if not kls:
        raise MarglikError("the model has no DirichletAttention module: it has no attention KL")
    if any(k is None for k in kls):
        raise MarglikError("run a forward pass before reading the attention KL")
    return torch.stack(kls).sum(0)


def elbo(model: nn.Module, x: Tensor, y: Tensor, kl_weight: float = 1.0) -> Tensor:
    """One-sample estimate of ELBO / N on a batch, for classification.

    Args:
        model: a classifier with Dirichlet attention (its rows are sampled in training mode or
            with ``sample`` set; in eval mode without it this is the mean-attention objective).
        x: the model input (e.g. ids ``(B, L)``).
        y: integer targets ``(B,)``.
        kl_weight: w_KL (1: the ELBO).

    Returns:
        0-d tensor (1/B) Σ_n [log softmax(f(x_n, A_n))_{y_n} − w_KL · KL_n]; maximise it.
    """
    logits = model(x)
    if logits.dim() != 2 or y.shape != logits.shape[:1]:
        raise MarglikError(f"y must have shape ({logits.shape[0]},), got {tuple(y.shape)}")
    loglik = -F.cross_entropy(logits, y, reduction="none")
    return (loglik - kl_weight * attention_kl(model)).mean()


@contextmanager
def mc_sampling(model: nn.Module, attention: bool = True, dropout: bool = False) -> Iterator[None]:
    """Eval mode with stochastic attention rows and / or active dropout; restores every flag."""
    flags = {m: m.training for m in model.modules()}
    samples = {m: m.sample for m in model.modules() if isinstance(m, DirichletAttention)}
    try:
        model.eval()
        for m in model.modules():
            if isinstance(m, DirichletAttention):
                m.sample = attention
            elif isinstance(m, nn.Dropout) and dropout:
                m.train()
        yield
    finally:
        for m, flag in flags.items():
            m.train(flag)
        for m, flag in samples.items():
            m.sample = flag


@torch.no_grad()
def predict_mc(model: nn.Module, x: Tensor, n_samples: int = 32, attention: bool = True,
               dropout: bool = False) -> Tensor:
    """Monte Carlo predictive p(y | x) ≈ (1/S) Σ_s softmax(f(x; A_s)), ``(N, C)``.

    Each of the S passes samples every attention row (``attention``) and / or dropout masks
    (``dropout``, MC dropout) for the whole batch at once.
    """
    if n_samples < 1:
        raise MarglikError(f"n_samples must be at least 1, got {n_samples}")
    with mc_sampling(model, attention, dropout):
        probs = model(x).softmax(-1)
        for _ in range(n_samples - 1):
            probs += model(x).softmax(-1)
    return probs / n_samples
