"""When to stop online evidence training: the training evidence has stopped rising.

:func:`~marglik.training.online.marglik_training` evaluates the log evidence log Z every
``marglik_frequency`` epochs after the burn-in and keeps the state of the best one. With a fixed
number of epochs, training either stops while log Z is still rising (the state kept is a
point on the way) or runs on long after it has levelled off (time spent for nothing). Its
``stop`` argument takes a rule ``stop(epoch, history) -> bool`` called after every epoch;
:class:`EvidencePlateau` ends training once the best log Z has not risen by ``min_delta`` nats
over ``patience`` consecutive evaluations. The data used are the training data only (the
evidence is the criterion the hyperparameters are chosen by, so no validation split is needed).

The default ``min_delta = 1`` nat is the scale of Bayes factors: two states whose log evidence
differs by less than 1 (a Bayes factor below e) are "not worth more than a bare mention" apart
(Kass & Raftery, JASA 1995, §3.2, after Jeffreys 1961).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["EvidencePlateau"]


@dataclass(frozen=True)
class EvidencePlateau:
    """Stop when the best log evidence has not risen by ``min_delta`` in ``patience`` evaluations.

    Reads ``history["log_marglik"]`` (one entry per epoch, NaN where log Z was not evaluated:
    :func:`~marglik.training.online.marglik_training`'s history). Let z_1, z_2, … be the
    evaluated values and r the reference: r = z_1 at first, and an evaluation z_k is an
    improvement when z_k ≥ r + ``min_delta`` (then r = z_k). The rule returns True once the
    last ``patience`` evaluations are none of them an improvement. Non-finite values are never
    improvements. The rule holds no state (it recomputes from the history), so it gives the same
    answers after a checkpoint resume.

    Args:
        patience: evaluations without an improvement before stopping (≥ 1).
        min_delta: the rise in nats that counts as an improvement (≥ 0; default 1 nat, a Bayes
            factor of e).
    """

    patience: int = 3
    min_delta: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or \
                self.patience < 1:
            raise ValueError(f"patience must be an integer ≥ 1, got {self.patience!r}")
        if not (isinstance(self.min_delta, (int, float)) and math.isfinite(self.min_delta)
                and self.min_delta >= 0):
            raise ValueError(f"min_delta must be finite and ≥ 0, got {self.min_delta!r}")

    def evaluations_without_improvement(self, log_margliks: list[float]) -> int:
        """The number of evaluations since the last improvement (0 right after one; the first
        finite evaluation is an improvement). NaN entries (epochs without an evaluation) are
        skipped; −inf and +inf entries count as evaluations that do not improve."""
        since, ref = 0, -math.inf
        for z in (z for z in log_margliks if not math.isnan(z)):
            if math.isfinite(z) and (ref == -math.inf or z >= ref + self.min_delta):
                since, ref = 0, z
            else:
                since += 1
        return since

    def __call__(self, epoch: int, history: dict[str, list]) -> bool:
        """True when training should end after ``epoch`` (``history`` as above)."""
        return self.evaluations_without_improvement(history["log_marglik"]) >= self.patience
