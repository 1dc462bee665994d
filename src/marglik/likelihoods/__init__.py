"""Observation models p(y | f): log-likelihood, output Hessian Λ and its factorisation."""

from __future__ import annotations

from marglik.likelihoods.base import Likelihood
from marglik.likelihoods.bernoulli import Bernoulli
from marglik.likelihoods.categorical import Categorical
from marglik.likelihoods.custom import Custom
from marglik.likelihoods.gaussian import Gaussian
from marglik.likelihoods.heteroscedastic import NaturalGaussian

__all__ = [
    "Likelihood",
    "Gaussian",
    "Categorical",
    "Bernoulli",
    "Custom",
    "NaturalGaussian",
    "get_likelihood",
]


def get_likelihood(likelihood: str | Likelihood, sigma_noise: float = 1.0) -> Likelihood:
    """Resolve ``"regression" | "classification" | "binary"`` or a Likelihood object."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    names = {
        "regression": lambda: Gaussian(sigma_noise),
        "classification": Categorical,
        "binary": Bernoulli,
    }
    if likelihood not in names:
        raise ValueError(
            f"unknown likelihood {likelihood!r}: use one of {sorted(names)} or a Likelihood object"
        )
    return names[likelihood]()
