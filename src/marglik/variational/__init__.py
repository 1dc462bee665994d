"""Variational methods of the same research line as the Laplace engine (methods.md §10).

They infer with variational distributions, not a Laplace posterior, and use nothing of the
engine; they sit beside :mod:`marglik.applications` in the pipeline (they may use ``marglik.nets``,
``marglik.metrics`` and ``marglik.errors``, and no application or CLI imports them).

- :mod:`~marglik.variational.graph` — Bayesian graph contrastive learning (Möllers, Immer, Isufi &
  Fortuin, AABI 2023).
- :mod:`~marglik.variational.attention` — Dirichlet attention for transformers (Cinquin, Immer,
  Horn & Fortuin, AABI 2022).

Nothing is imported by this package itself, so importing one method does not load the other.
"""
