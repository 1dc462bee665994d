"""Evidence-based probing (Immer, Torroba Hennigen, Fortuin & Cotterell, ACL 2022).

Rank frozen representations for a task by the Laplace evidence of the best probe family, each
family trained by online evidence maximisation. See ``docs/probing.md``.

- :mod:`~marglik.applications.probing.families` — the probe-family registry
  (:class:`ProbeFamily`, :data:`PROBE_FAMILIES`, :func:`register_probe_family`);
- :mod:`~marglik.applications.probing.inputs` — sentence-, token- and pair-level rows
  (:func:`probe_inputs`);
- :mod:`~marglik.applications.probing.evidence` — :func:`probe_evidence` and its
  :class:`ProbeResult`.
"""

from marglik.applications.probing.evidence import ProbeResult, probe_evidence
from marglik.applications.probing.families import (
    PROBE_FAMILIES,
    ProbeFamily,
    build_probe,
    register_probe_family,
    resolve_probes,
)
from marglik.applications.probing.inputs import encode_labels, probe_inputs

__all__ = ["PROBE_FAMILIES", "ProbeFamily", "ProbeResult", "build_probe", "encode_labels",
           "probe_evidence", "probe_inputs", "register_probe_family", "resolve_probes"]
