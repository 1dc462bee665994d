"""Applications: complete methods built on the Laplace engine, one module or package each.

- :mod:`~marglik.applications.heteroscedastic` — heteroscedastic regression with natural-parameter
  networks trained by the Laplace evidence, and their predictive (Immer et al., NeurIPS 2023):
  :func:`~marglik.applications.heteroscedastic.fit_heteroscedastic`,
  :func:`~marglik.applications.heteroscedastic.heteroscedastic_predictive`.
- :mod:`~marglik.applications.causal` — cause–effect direction in location-scale noise models
  with LOCI (Immer et al., ICML 2023): :func:`~marglik.applications.causal.loci`; needs the
  ``causal`` extra (scikit-learn, scipy).
- :mod:`~marglik.applications.tabular` — MLPs on CSV tables with the evidence choosing the
  hyperparameters (what ``marglik fit`` and ``marglik predict`` run).
- :mod:`~marglik.applications.probing` — evidence-based probing of frozen representations
  (Immer et al., ACL 2022): :func:`~marglik.applications.probing.probe_evidence`.

New applications go here too. Nothing is imported by this package itself, so importing one
application does not load the others (or their optional dependencies).
"""
