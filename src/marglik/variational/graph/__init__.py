"""Bayesian graph contrastive learning (Möllers, Immer, Isufi & Fortuin, AABI 2023).

A two-layer GCN encoder, deterministic or with mean-field Gaussian weights, trained by GRACE's
contrastive objective between two augmented views (as an ELBO for the variational encoder),
evaluated by logistic regression on frozen embeddings with few labels, with the paper's
uncertainty: the disagreement of a node's contrastive likelihood over positive samples. Plain
torch, sparse adjacency; see docs/graph-contrastive.md.

- :mod:`.adjacency` — Â = D̃^{-1/2}(A + I)D̃^{-1/2} as a sparse tensor.
- :mod:`.layers` — the GCN layer, its mean-field Gaussian version, the Gaussian KL.
- :mod:`.encoder` — the two-layer encoder and its projection head.
- :mod:`.augment` — edge dropping, feature masking, two views.
- :mod:`.contrastive` — InfoNCE and GRACE's NT-Xent log-likelihoods.
- :mod:`.objective` — the ELBO and full-batch training.
- :mod:`.uncertainty` — contrastive likelihoods over positive samples and their disagreement.
- :mod:`.evaluation` — few-label splits, the linear probe, misclassification AUROC, binned
  error rates.
- :mod:`.csbm` — the contextual stochastic block model (offline data).
"""

from marglik.variational.graph.adjacency import normalized_adjacency, undirected_edges
from marglik.variational.graph.augment import drop_edges, mask_features, two_views
from marglik.variational.graph.contrastive import (
    cosine_scores,
    info_nce_log_likelihood,
    nt_xent_log_likelihood,
)
from marglik.variational.graph.csbm import GraphData, contextual_sbm
from marglik.variational.graph.encoder import GCNEncoder
from marglik.variational.graph.evaluation import (
    LinearProbe,
    binned_error_rate,
    few_label_split,
    fit_linear_probe,
    misclassification_auroc,
)
from marglik.variational.graph.layers import (
    BayesianGCNLayer,
    GCNLayer,
    gaussian_kl,
    gcn_propagate,
)
from marglik.variational.graph.objective import ELBO, elbo, train_contrastive
from marglik.variational.graph.uncertainty import disagreement, positive_likelihoods

__all__ = [
    "ELBO",
    "BayesianGCNLayer",
    "GCNEncoder",
    "GCNLayer",
    "GraphData",
    "LinearProbe",
    "binned_error_rate",
    "contextual_sbm",
    "cosine_scores",
    "disagreement",
    "drop_edges",
    "elbo",
    "few_label_split",
    "fit_linear_probe",
    "gaussian_kl",
    "gcn_propagate",
    "info_nce_log_likelihood",
    "mask_features",
    "misclassification_auroc",
    "normalized_adjacency",
    "nt_xent_log_likelihood",
    "positive_likelihoods",
    "train_contrastive",
    "two_views",
    "undirected_edges",
]
