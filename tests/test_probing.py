"""Evidence-based probing: evidence against brute force, ranking sanity, rows per level, errors,
reproducibility (marglik.applications.probing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marglik.applications.probing import (
    PROBE_FAMILIES,
    ProbeFamily,
    build_probe,
    probe_evidence,
    probe_inputs,
    register_probe_family,
    resolve_probes,
)
from tests import oracle

FAST = {"n_epochs": 8, "n_hypersteps": 10, "marglik_frequency": 2}


def _tiny(n: int = 30, d: int = 3, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 1
    W = torch.randn(d, c, generator=g, dtype=torch.float64)
    logits = X @ W + 0.5 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return X, logits.argmax(1)


def _brute_force_evidence(model, X, y, delta_per_param, structure):
    """log p(y|θ*) − ½ θᵀdiag(δ)θ − ½ (log det(H + diag δ) − Σ log δ), H from dense Jacobians."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with torch.no_grad():
        log_lik = -oracle.categorical_nll(model(X), y)
    if structure == "kron":  # single linear layer: weight block G ⊗ A, bias block G
        probs = torch.softmax(model(X).detach(), -1)
        lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        G, A = lam.sum(0), X.T @ X / len(X)
        H = torch.block_diag(torch.kron(G, A), G)
    else:
        H = oracle.ggn(model, X, y, oracle.categorical_nll)
        if structure == "diag":
            H = torch.diag(torch.diagonal(H))
    P = H + torch.diag(delta_per_param)
    return (log_lik - 0.5 * (delta_per_param * theta**2).sum()
            - 0.5 * (torch.linalg.slogdet(P)[1] - delta_per_param.log().sum()))


FULL_LINEAR = ProbeFamily("test-linear-full-layerwise", 0, "full", "layerwise")
FULL_MLP = ProbeFamily("test-mlp1-full-diagonal", 1, "full", "diagonal", width=4, activation="tanh")


@pytest.mark.parametrize("family", ["linear-kron-layerwise", "linear-diag-diagonal",
                                    "mlp1-diag-layerwise", FULL_LINEAR, FULL_MLP])
def test_evidence_equals_brute_force_laplace_evidence(family):
    X, y = _tiny()
    res = probe_evidence(X, y, family, width=5, **FAST)
    name = res.best
    model = res.probes[name]
    Xs = (X - X.mean(0)) / X.std(0, correction=0)  # the standardisation, computed here
    sizes = torch.tensor([p.numel() for p in model.parameters()])
    delta = res.posteriors[name].prior_precision.detach()
    delta = delta.repeat_interleave(sizes) if delta.numel() == len(sizes) else delta
    assert delta.numel() == sizes.sum()
    structure = res.families[name].hessian_structure
    expected = _brute_force_evidence(model, Xs, y, delta, structure)
    assert res.log_evidence[name] == pytest.approx(expected.item(), rel=1e-10, abs=1e-9)
    assert res.best_log_evidence == res.log_evidence[name]
    # the trained probe and δ differ from their start: online training ran
    assert not torch.allclose(delta, torch.ones_like(delta))


def test_informative_features_beat_random_labels_and_random_features():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(240, 4, generator=g)
    y = (X @ torch.randn(4, 3, generator=g)).argmax(1)
    probes = ["linear-kron-layerwise", "mlp1-diag-diagonal"]
    kw = {"n_epochs": 40, "n_hypersteps": 20, "marglik_frequency": 4, "width": 16,
          "batch_size": 40}
    informative = probe_evidence(X, y, probes, **kw)
    control = probe_evidence(X, y[torch.randperm(240, generator=g)], probes, **kw)
    noise = probe_evidence(torch.randn(240, 4, generator=g), y, probes, **kw)
    counts = torch.bincount(y).double()
    constant = (counts * (counts / 240).log()).sum().item()  # log p(y) of the best constant
    assert informative.best_log_evidence > noise.best_log_evidence + 100
    assert informative.best_log_evidence > control.best_log_evidence + 100
    assert informative.best_log_evidence > constant + 100
    # with nothing to learn, no family beats predicting the class frequencies
    assert max(control.best_log_evidence, noise.best_log_evidence) < constant
    # the rule is linear: the linear probe finds it about as well as the MLP
    assert informative.log_evidence["linear-kron-layerwise"] > constant + 100


def test_reproducible_and_leaves_the_global_rng_alone():
    X, y = _tiny(n=40)
    kw = {**FAST, "batch_size": 16, "width": 6}
    state = torch.get_rng_state()
    a = probe_evidence(X, y, ["linear-diag-layerwise", "mlp2-kron-layerwise"], **kw, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = probe_evidence(X, y, ["mlp2-kron-layerwise", "linear-diag-layerwise"], **kw, seed=3)
    c = probe_evidence(X, y, ["linear-diag-layerwise", "mlp2-kron-layerwise"], **kw, seed=4)
    assert a.log_evidence == b.log_evidence  # equal seeds, independent of the order
    for name in a.probes:
        for (k, v), w in zip(a.probes[name].state_dict().items(),
                             b.probes[name].state_dict().values(), strict=True):
            assert torch.equal(v, w), k
    assert all(a.log_evidence[k] != c.log_evidence[k] for k in a.log_evidence)


def test_result_accessors():
    X, y = _tiny(n=24)
    labels = np.array(["b", "a", "c"])[y.numpy()]
    res = probe_evidence(X, labels, "linear", **FAST)
    assert res.classes == ["a", "b", "c"]
    assert list(res.log_evidence) == ["linear-kron-layerwise", "linear-diag-layerwise",
                                      "linear-diag-diagonal"]
    rows = res.rows()
    assert [r["family"] for r in rows] == list(res.log_evidence)
    assert rows[0]["log_evidence_per_datum"] == res.log_evidence[rows[0]["family"]] / 24
    probs = res.predict_proba(X)
    Xs = (X - X.mean(0)) / X.std(0, correction=0)
    expected = torch.softmax(res.probes[res.best](Xs), -1)
    torch.testing.assert_close(probs, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.predict_proba(X.numpy(), "linear-diag-layerwise"),
                               torch.softmax(res.probes["linear-diag-layerwise"](Xs), -1).detach())
    with pytest.raises(ValueError, match=r"X must have shape \(M, 3\)"):
        res.predict_proba(X[:, :2])
    with pytest.raises(ValueError, match="no probe family 'mlp1'"):
        res.predict_proba(X, "mlp1")


# ---- rows at sentence, token and pair level --------------------------------------------------

def _tokens(n=4, length=5, d=3):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, length, d, generator=g)


def test_token_level_rows_drop_padding_and_masked_tokens():
    H = _tokens()
    labels = torch.randint(0, 3, (4, 5), generator=torch.Generator().manual_seed(0))
    labels[0, 3:] = -100
    labels[2, 4] = -100
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[3, 0] = False
    X, y = probe_inputs(H, labels, "token", mask=mask)
    keep = [(n, t) for n in range(4) for t in range(5)
            if labels[n, t] != -100 and mask[n, t]]
    assert torch.equal(X, torch.stack([H[n, t] for n, t in keep]))
    assert torch.equal(y, torch.stack([labels[n, t] for n, t in keep]))


def test_pair_level_rows_concatenate_the_two_tokens():
    H = _tokens()
    pairs = torch.tensor([[0, 1, 2], [3, 4, 0], [1, 2, 2]])
    labels = torch.tensor([1, 0, 1])
    X, y = probe_inputs(H, labels, "pair", pairs=pairs)
    assert torch.equal(X, torch.stack([torch.cat([H[n, i], H[n, j]]) for n, i, j in pairs]))
    X3, _ = probe_inputs(H, labels, "pair", pairs=pairs.numpy(), pair_combine="concat-product")
    assert torch.equal(X3, torch.stack([torch.cat([H[n, i], H[n, j], H[n, i] * H[n, j]])
                                        for n, i, j in pairs]))
    assert torch.equal(y, labels)


def test_sentence_level_rows_average_the_masked_tokens():
    H = _tokens()
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 1, 1, 0, 1]],
                        dtype=torch.bool)
    X, _ = probe_inputs(H, [0, 1, 0, 1], "sentence", mask=mask)
    expected = torch.stack([H[n][mask[n]].mean(0) for n in range(4)])
    torch.testing.assert_close(X, expected, rtol=1e-14, atol=1e-14)
    X_all, _ = probe_inputs(H.numpy(), np.array([0, 1, 0, 1]), "sentence")
    torch.testing.assert_close(X_all, H.mean(1), rtol=1e-14, atol=1e-14)
    X_half, _ = probe_inputs(H.half().requires_grad_(), [0, 1, 0, 1], "sentence")
    assert X_half.dtype == torch.float32 and not X_half.requires_grad


def test_pair_level_probe_end_to_end():
    H = _tokens(n=10, length=4, d=2)
    g = torch.Generator().manual_seed(5)
    pairs = torch.stack([torch.randint(0, 10, (60,), generator=g),
                         torch.randint(0, 4, (60,), generator=g),
                         torch.randint(0, 4, (60,), generator=g)], 1)
    labels = (H[pairs[:, 0], pairs[:, 1], 0] > H[pairs[:, 0], pairs[:, 2], 0]).long()
    res = probe_evidence(H, labels, "linear-kron-layerwise", level="pair", pairs=pairs, **FAST)
    assert res.n_data == 60 and res.probes[res.best].in_features == 4


# ---- the family registry ---------------------------------------------------------------------

def test_registry_and_probe_shapes():
    assert len(PROBE_FAMILIES) == 9
    assert [f.name for f in resolve_probes("mlp2")] == [
        "mlp2-kron-layerwise", "mlp2-diag-layerwise", "mlp2-diag-diagonal"]
    assert len(resolve_probes(["all", "linear-kron-layerwise"])) == 9
    net = build_probe(PROBE_FAMILIES["mlp2-diag-diagonal"], 7, 3, width=5)
    assert [tuple(p.shape) for p in net.parameters()] == [(5, 7), (5,), (5, 5), (5,), (3, 5), (3,)]
    fam = ProbeFamily("test-registered", 1, "diag", "scalar", width=3)
    try:
        register_probe_family(fam)
        assert resolve_probes("test-registered") == [fam]
        with pytest.raises(ValueError, match="already registered"):
            register_probe_family(fam)
    finally:
        PROBE_FAMILIES.pop("test-registered", None)


# ---- bad input -------------------------------------------------------------------------------

X0, Y0 = _tiny(n=12)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((X0, Y0, "mlp3"), {}, ValueError, "unknown probe family 'mlp3'"),
    ((X0, Y0, []), {}, ValueError, "no probe family"),
    ((X0, Y0, [3]), {}, TypeError, "a probe must be a name"),
    ((X0.long(), Y0), {}, TypeError, "features must be floating"),
    (("abc", Y0), {}, TypeError, "features must be a tensor"),
    ((X0.clone().index_fill_(0, torch.tensor([2]), float("nan")), Y0), {}, ValueError,
     "NaN or infinite"),
    ((X0, Y0.double()), {}, TypeError, "labels must be integer class ids"),
    ((X0, Y0[:-1]), {}, ValueError, r"labels must have shape \(12,\)"),
    ((X0, torch.zeros(12, dtype=torch.long)), {}, ValueError, "at least 2"),
    ((X0, Y0), {"level": "word"}, ValueError, "level must be one of"),
    ((X0, Y0), {"level": "token"}, ValueError, r"token features, got shape \(12, 3\)"),
    ((X0[None], Y0[None, :5]), {"level": "token"}, ValueError, "token-level labels must have"),
    ((X0[None], Y0[:2]), {"level": "pair"}, ValueError, "needs pairs"),
    ((X0[None], Y0[:2]), {"level": "pair", "pairs": [[0, 1, 12], [0, 0, 0]]}, ValueError,
     "pairs index outside"),
    ((X0[None], Y0[:2]), {"level": "pair", "pairs": [[0, 1]]}, ValueError, r"\(M, 3\)"),
    ((X0[None], Y0[:2]), {"level": "pair", "pairs": [[0, 1, 2], [0, 0, 0]],
                          "pair_combine": "sum"}, ValueError, "pair_combine must be"),
    ((X0, Y0), {"pairs": [[0, 1, 2]]}, ValueError, "only with level='pair'"),
    ((X0[None].expand(2, -1, -1), Y0[:2]), {"mask": torch.zeros(2, 12, dtype=torch.bool)},
     ValueError, "without tokens"),
    ((X0[None].expand(2, -1, -1), Y0[:2]), {"mask": torch.ones(2, 11, dtype=torch.bool)},
     ValueError, "mask must have shape"),
    ((X0, Y0), {"width": 0}, ValueError, "width must be a positive integer"),
    ((X0, Y0), {"batch_size": 2.5}, ValueError, "batch_size must be a positive integer"),
    ((X0, Y0), {"lr": -1.0}, ValueError, "lr must be a positive finite number"),
    ((X0, Y0), {"seed": "0"}, TypeError, "seed must be an integer"),
    ((X0, Y0), {"training_kwargs": {"n_epochs": 3}}, ValueError, "not in training_kwargs"),
])
def test_bad_input_raises_a_clear_error(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        probe_evidence(*args, **{**FAST, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    ({"n_hidden": -1}, "n_hidden must be"),
    ({"hessian_structure": "lowrank"}, "hessian_structure must be one of"),
    ({"prior_structure": "perlayer"}, "prior_structure must be one of"),
    ({"hessian_structure": "kron", "prior_structure": "diagonal"}, "one prior precision per layer"),
    ({"width": 0}, "width must be"),
    ({"activation": "gelu"}, "activation must be one of"),
])
def test_bad_family_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProbeFamily("bad", **{"n_hidden": 1, **kwargs})
