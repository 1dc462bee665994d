"""The training-length rule (training/stopping.py): EvidencePlateau on hand-made histories,
``marglik_training(stop=...)`` and ``fit_additive(patience=...)`` against the same run without
the rule (float64, deterministic: the stopped run must be the prefix of the full run that ends
where the rule first fires)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from marglik.applications.additive import fit_additive
from marglik.training import EvidencePlateau, marglik_training

torch.set_num_threads(1)
NAN = math.nan


def _history(values: list[float]) -> dict[str, list]:
    return {"log_marglik": values}


# ------------------------------------------------------------------------- the rule alone
def test_plateau_counts_evaluations_since_the_last_rise_of_min_delta():
    rule = EvidencePlateau(patience=2, min_delta=1.0)
    # NaN epochs are not evaluations; 10 → 10.5 → 10.9 do not rise by 1 over 10, 11.2 does
    z = [NAN, NAN, 10.0, NAN, 10.5, NAN, 10.9, 11.2, 11.0]
    counts = [rule.evaluations_without_improvement(z[: i + 1]) for i in range(len(z))]
    assert counts == [0, 0, 0, 0, 1, 1, 2, 0, 1]
    assert [rule(i, _history(z[: i + 1])) for i in range(len(z))] == [
        False, False, False, False, False, False, True, False, False]


def test_plateau_slow_steady_rise_keeps_training():
    # +0.6 nats per evaluation: every second one is an improvement of ≥ 1 over the reference
    z = [0.6 * k for k in range(40)]
    assert EvidencePlateau(patience=2).evaluations_without_improvement(z) <= 1
    assert not EvidencePlateau(patience=2)(39, _history(z))
    # but with a larger min_delta it stops
    assert EvidencePlateau(patience=2, min_delta=2.0)(39, _history(z))


def test_plateau_non_finite_values_are_not_improvements():
    rule = EvidencePlateau(patience=3, min_delta=0.0)
    assert rule.evaluations_without_improvement([-math.inf, 1.0]) == 0
    assert rule.evaluations_without_improvement([1.0, math.inf, -math.inf, 0.5]) == 3
    assert rule.evaluations_without_improvement([]) == 0
    assert rule.evaluations_without_improvement([1.0, 1.0]) == 0  # min_delta 0: ties improve


@pytest.mark.parametrize("kwargs", [dict(patience=0), dict(patience=1.5), dict(patience=True),
                                    dict(min_delta=-1.0), dict(min_delta=math.nan)])
def test_plateau_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="patience|min_delta"):
        EvidencePlateau(**kwargs)


# ------------------------------------------------------------------ marglik_training(stop=)
def _train(n_epochs: int, stop=None):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, generator=g, dtype=torch.float64) * 4 - 2
    y = 0.5 * x + 0.1 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    return marglik_training(model, loader, "regression", n_epochs=n_epochs, lr=1e-2,
                            n_epochs_burnin=2, marglik_frequency=2, n_hypersteps=20, stop=stop)


def test_marglik_training_stops_where_the_rule_first_fires_and_keeps_the_best_state():
    rule = EvidencePlateau(patience=2, min_delta=1.0)
    _, _, full = _train(200)
    # the epoch where the rule, applied to the uninterrupted run, first says stop
    fires = [e for e in range(200) if rule(e, {"log_marglik": full["log_marglik"][: e + 1]})]
    assert fires, "the evidence of this tiny problem should level off well before 200 epochs"
    first = fires[0]
    assert first < 150
    la, _, stopped = _train(200, stop=rule)
    assert len(stopped["loss"]) == first + 1
    # the stopped run is the beginning of the full run, to the last digit
    assert stopped["loss"] == full["loss"][: first + 1]
    evaluated = [v for v in stopped["log_marglik"] if not math.isnan(v)]
    assert evaluated == [v for v in full["log_marglik"][: first + 1] if not math.isnan(v)]
    # the returned posterior is refitted at the best state of the stopped run
    torch.testing.assert_close(la.log_marginal_likelihood().item(), max(evaluated),
                               rtol=1e-10, atol=1e-10)


def test_marglik_training_honours_n_epochs_as_the_maximum():
    calls: list[int] = []

    def never(epoch: int, history: dict) -> bool:
        calls.append(epoch)
        return False

    _, _, history = _train(7, stop=never)
    assert len(history["loss"]) == 7 and calls == list(range(7))


# ------------------------------------------------------------------- fit_additive(patience=)
def _additive(**kwargs):
    g = torch.Generator().manual_seed(3)
    X = torch.rand(60, 2, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(60, generator=g, dtype=torch.float64)
    return fit_additive(X, y, hidden=(4,), batch_size=30, n_epochs_burnin=3,
                        marglik_frequency=3, n_hypersteps=10, seed=0, **kwargs)


def test_fit_additive_stops_on_an_evidence_plateau_and_honours_the_maximum():
    full = _additive(n_epochs=300)  # patience=None: all epochs
    assert full.epochs_run == 300
    rule = EvidencePlateau(patience=3, min_delta=1.0)
    z = full.history["log_marglik"]
    first = next(e for e in range(300) if rule(e, {"log_marglik": z[: e + 1]}))
    stopped = _additive(n_epochs=300, patience=3, min_delta=1.0)
    assert stopped.epochs_run == first + 1 < 300
    assert stopped.history["loss"] == full.history["loss"][: first + 1]
    assert stopped.options["patience"] == 3
    # the maximum: a rule that cannot fire within 12 epochs (4 evaluations, patience 5)
    assert _additive(n_epochs=12, patience=5).epochs_run == 12
    with pytest.raises(ValueError, match="patience"):
        _additive(n_epochs=2, patience=0)
