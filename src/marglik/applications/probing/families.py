"""The probe-family registry: which probes :func:`~marglik.applications.probing.probe_evidence`
trains, each a network shape with a Laplace posterior structure and a prior structure.

A probe family (Immer, Torroba Hennigen, Fortuin & Cotterell, ACL 2022, §4) is a model class
p(y | r(x), θ) p(θ | δ) on a frozen representation r(x): a linear map, or an MLP with one or two
hidden layers, with a Gaussian prior N(0, diag(δ)⁻¹) whose precision is one value per parameter
tensor (``"layerwise"``) or one per parameter (``"diagonal"``; ``"scalar"`` is also accepted),
and a posterior curvature ``"kron"`` (KFAC) or ``"diag"`` (diagonal GGN). The prior structures
are those :func:`marglik.marglik_training` learns (``marglik.Prior.shape``).

A Kronecker-factored block adds its prior through the eigenvalues of its factors, which needs
one precision per block: KFAC takes a scalar or layer-wise prior, not a per-parameter one. The
built-in families are the nine combinations {linear, mlp1, mlp2} × {kron-layerwise,
diag-layerwise, diag-diagonal}, named ``"<architecture>-<structure>-<prior>"``, e.g.
``"mlp1-kron-layerwise"``. Register more with :func:`register_probe_family`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

__all__ = [
    "ARCHITECTURES",
    "PROBE_FAMILIES",
    "ProbeFamily",
    "build_probe",
    "register_probe_family",
    "resolve_probes",
]

#: number of hidden layers of each built-in architecture
ARCHITECTURES: dict[str, int] = {"linear": 0, "mlp1": 1, "mlp2": 2}
#: posterior curvature structures a probe may use
STRUCTURES = ("kron", "diag", "full")
#: prior-precision structures :func:`marglik.marglik_training` learns
PRIORS = ("layerwise", "diagonal", "scalar")


@dataclass(frozen=True)
class ProbeFamily:
    """A probe family: ``n_hidden`` hidden layers of ``width`` units (``None``: the width given
    to ``probe_evidence``), activation ``activation`` (``"relu" | "tanh"``), Laplace structure
    ``hessian_structure`` and prior structure ``prior_structure``."""

    name: str
    n_hidden: int
    hessian_structure: str = "kron"
    prior_structure: str = "layerwise"
    width: int | None = None
    activation: str = "relu"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a probe family needs a non-empty name, got {self.name!r}")
        if isinstance(self.n_hidden, bool) or not isinstance(self.n_hidden, int) \
                or self.n_hidden < 0:
            raise ValueError(f"n_hidden must be a non-negative integer, got {self.n_hidden!r}")
        if self.hessian_structure not in STRUCTURES:
            raise ValueError(f"hessian_structure must be one of {STRUCTURES}, got "
                             f"{self.hessian_structure!r}")
        if self.prior_structure not in PRIORS:
            raise ValueError(f"prior_structure must be one of {PRIORS}, got "
                             f"{self.prior_structure!r}")
        if self.hessian_structure == "kron" and self.prior_structure == "diagonal":
            raise ValueError("a KFAC ('kron') posterior needs one prior precision per layer: "
                             "use prior_structure 'layerwise' or 'scalar', or a 'diag' or "
                             "'full' posterior for a per-parameter prior")
        if self.width is not None and (isinstance(self.width, bool)
                                       or not isinstance(self.width, int) or self.width < 1):
            raise ValueError(f"width must be a positive integer or None, got {self.width!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got "
                             f"{self.activation!r}")

    @property
    def architecture(self) -> str:
        """``"linear"`` or ``"mlp<k>"``."""
        return "linear" if self.n_hidden == 0 else f"mlp{self.n_hidden}"


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}

PROBE_FAMILIES: dict[str, ProbeFamily] = {}


def register_probe_family(family: ProbeFamily, overwrite: bool = False) -> ProbeFamily:
    """Add ``family`` to :data:`PROBE_FAMILIES` under its name (``overwrite`` to replace one)."""
    if not isinstance(family, ProbeFamily):
        raise TypeError(f"expected a ProbeFamily, got {type(family).__name__}")
    if family.name in PROBE_FAMILIES and not overwrite:
        raise ValueError(f"probe family {family.name!r} is already registered")
    PROBE_FAMILIES[family.name] = family
    return family


for _arch, (_structure, _prior) in itertools.product(
        ARCHITECTURES, [("kron", "layerwise"), ("diag", "layerwise"), ("diag", "diagonal")]):
    register_probe_family(ProbeFamily(f"{_arch}-{_structure}-{_prior}", ARCHITECTURES[_arch],
                                      _structure, _prior))


def resolve_probes(probes: str | ProbeFamily | Iterable[str | ProbeFamily]) -> list[ProbeFamily]:
    """The families named by ``probes``: ``"all"`` (every registered family), one name or
    family, or an iterable of them; a name may also be an architecture (``"mlp1"``: all its
    registered families). Order kept, duplicates dropped.

    Raises:
        ValueError: for an unknown name or an empty selection; TypeError for other types.
    """
    if isinstance(probes, (str, ProbeFamily)):
        probes = [probes]
    if not isinstance(probes, Iterable):
        raise TypeError(f"probes must be a name, a ProbeFamily or an iterable of them, got "
                        f"{type(probes).__name__}")
    chosen: dict[str, ProbeFamily] = {}
    for p in probes:
        if isinstance(p, ProbeFamily):
            found = [p]
        elif isinstance(p, str):
            if p == "all":
                found = list(PROBE_FAMILIES.values())
            elif p in PROBE_FAMILIES:
                found = [PROBE_FAMILIES[p]]
            else:
                found = [f for f in PROBE_FAMILIES.values() if f.architecture == p]
                if not found:
                    raise ValueError(f"unknown probe family {p!r}: use 'all', an architecture "
                                     f"{tuple(ARCHITECTURES)} or one of {sorted(PROBE_FAMILIES)}")
        else:
            raise TypeError(f"a probe must be a name or a ProbeFamily, got {type(p).__name__}")
        for f in found:
            if f.name in chosen and chosen[f.name] != f:
                raise ValueError(f"two different probe families are named {f.name!r}")
            chosen[f.name] = f
    if not chosen:
        raise ValueError("no probe family given")
    return list(chosen.values())


def build_probe(family: ProbeFamily, in_features: int, n_classes: int, width: int) -> nn.Module:
    """The probe network: ``nn.Linear`` (linear) or Linear–act–…–Linear with ``n_hidden``
    hidden layers of ``family.width or width`` units; maps (N, in_features) to (N, n_classes)
    logits. Initialised from torch's global RNG (seed it first)."""
    width = family.width or width
    sizes = [in_features] + [width] * family.n_hidden + [n_classes]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        if i > 0:
            layers.append(_ACTIVATIONS[family.activation]())
        layers.append(nn.Linear(d_in, d_out))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
