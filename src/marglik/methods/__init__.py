"""Complete methods built on the Laplace engine (training, prediction and evaluation helpers)."""

from marglik.methods.heteroscedastic import (
    HeteroscedasticPredictive,
    Standardisation,
    fit_heteroscedastic,
    heteroscedastic_predictive,
    mean_variance_network_to_natural,
)

__all__ = [
    "HeteroscedasticPredictive",
    "Standardisation",
    "fit_heteroscedastic",
    "heteroscedastic_predictive",
    "mean_variance_network_to_natural",
]
