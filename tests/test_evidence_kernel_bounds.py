"""Data-, output- and parameter-partitioned evidence bounds (evidence/bounds/kernel.py, rows.py,
partitions.py) against brute force on tiny float64 models.

The oracle builds the explicit N·C × N·C function-space matrix A = I + s·S J P0⁻¹ Jᵀ S (dense
``torch.func`` Jacobians, S = blockdiag of the principal roots Λ_n^½ from scipy's ``eigh``) and
the explicit P × P weight-space matrices per block, and takes ``slogdet`` of the blocks. The
inequalities are Fischer's and hold at every δ of the grid; class grouping beating random
grouping is *not* a theorem: it is checked on one fixed problem where it is expected (an
untrained network on well-separated classes) — on a trained toy network it fails (see
``docs/evidence-bounds.md``).
"""

import itertools
import math

import pytest
import scipy.linalg
import torch
from torch import nn

import marglik
from marglik.evidence import KernelBound, PartitionedEvidence, class_partitions, random_partitions
from marglik.evidence.bounds import check_partitions, partition_batches
from marglik.evidence.bounds.rows import function_space_rows, symmetric_root
from tests import oracle

SIGMA = 0.5
DELTAS = [0.05, 0.5, 5.0, 50.0]
LAYERWISE = [0.3, 2.0, 0.7, 5.0]
PARAMETERS = [None, "tensors", "layers", "diag", [["0.weight", "2.weight"], ["0.bias", "2.bias"]]]


def _problem(task, n=12):
    torch.manual_seed(0)
    c = 3 if task == "classification" else 2
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, c)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (torch.randint(0, c, (n,), generator=g) if task == "classification"
         else torch.randn(n, c, generator=g, dtype=torch.float64))
    return model, X, y


def _fit(model, X, y, task, structure="full"):
    sigma = {"sigma_noise": SIGMA} if task == "regression" else {}
    return marglik.Laplace(model, task, hessian_structure=structure, **sigma).fit([(X, y)])


def _nll(task, sigma=SIGMA):
    return oracle.categorical_nll if task == "classification" else oracle.gaussian_nll(sigma)


def _principal_root(L):
    """Q diag(√λ) Qᵀ with scipy's eigh (sqrtm loses ~1e-8 on the singular softmax Λ)."""
    evals, evecs = scipy.linalg.eigh(L)
    return (evecs * evals.clip(0) ** 0.5) @ evecs.T


def _oracle_bound(model, X, y, task, delta, partitions, outputs, param_blocks, sigma=SIGMA):
    """Explicit matrices: log p(D) − ½ δ‖θ‖² − ½ Σ_cells Σ_g [slogdet(P0_g + s·G_cgᵀG_cg) −
    slogdet P0_g] with G_c the rows of the cell (data block × output) and P0 = diag(δ)."""
    nll = _nll(task, sigma)
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    P = len(theta)
    J = oracle.jacobians(model, X)  # (N, C, P)
    with torch.no_grad():
        f = model(X)
    Lam = oracle.output_hessians(nll, f, y)  # (N, C, C)
    roots = torch.stack([torch.as_tensor(_principal_root(L.numpy())) for L in Lam])
    G = roots @ J  # (N, C, P)
    C = G.shape[1]
    log_lik = -nll(f, y)
    if task == "regression":
        log_lik = log_lik - y.numel() * math.log(sigma * math.sqrt(2 * math.pi))
    d = torch.as_tensor(delta, dtype=torch.float64)
    if d.ndim == 1 and len(d) == 4:  # one per tensor
        d = torch.cat([v.expand(p.numel()) for v, p in zip(d, model.parameters())])
    d = d.expand(P)
    P0 = torch.diag(d)
    cells = [(idx, None) for idx in partitions] if not outputs else [
        (idx, c) for idx in partitions for c in range(C)]
    blocks = param_blocks or [torch.arange(P)]
    logdet = 0.0
    for idx, c in cells:
        rows = G[idx].reshape(-1, P) if c is None else G[idx, c]
        W = P0 + rows.T @ rows
        for cols in blocks:
            logdet = logdet + torch.linalg.slogdet(W[cols][:, cols])[1] \
                - torch.linalg.slogdet(P0[cols][:, cols])[1]
    return log_lik - 0.5 * (d * theta.square()).sum() - 0.5 * logdet


def _columns(model, spec):
    """Column indices of the parameter blocks for the oracle."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    names = list(sizes)
    offsets = dict(zip(names, torch.tensor([0, *sizes.values()]).cumsum(0).tolist()))
    if spec is None:
        return None
    if spec == "diag":
        return [torch.tensor([i]) for i in range(sum(sizes.values()))]
    if spec == "tensors":
        spec = [[n] for n in names]
    if spec == "layers":
        spec = [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    return [torch.cat([torch.arange(offsets[n], offsets[n] + sizes[n]) for n in b]) for b in spec]


def test_symmetric_root():
    A = torch.randn(5, 4, 4, dtype=torch.float64)
    L = A @ A.mT
    L[0] = torch.diag(torch.tensor([0.3, 0.2, 0.5, 0.0], dtype=torch.float64))  # singular
    R = symmetric_root(L)
    torch.testing.assert_close(R, R.mT)
    torch.testing.assert_close(R @ R, L, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(R).min() > -1e-12


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("outputs", [False, True])
@pytest.mark.parametrize("parameters", PARAMETERS)
def test_bound_equals_explicit_blocks(task, outputs, parameters):
    model, X, y = _problem(task)
    la = _fit(model, X, y, task)
    parts = random_partitions(len(X), 4, torch.Generator().manual_seed(0))
    bound = KernelBound(la, [(X[:5], y[:5]), (X[5:], y[5:])], parts, outputs, parameters)
    for delta in (0.8, LAYERWISE):
        d = torch.tensor(delta, dtype=torch.float64)
        ref = _oracle_bound(model, X, y, task, d, parts, outputs, _columns(model, parameters))
        torch.testing.assert_close(bound(d), ref, rtol=1e-10, atol=1e-9)
    # a per-parameter δ goes through the Cholesky path of multi-parameter blocks
    d = torch.linspace(0.2, 3.0, la.n_params, dtype=torch.float64)
    ref = _oracle_bound(model, X, y, task, d, parts, outputs, _columns(model, parameters))
    torch.testing.assert_close(bound(d), ref, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_one_block_of_everything_is_the_exact_evidence(task):
    model, X, y = _problem(task)
    la = _fit(model, X, y, task)
    bound = KernelBound(la, [(X, y)])
    for d in [torch.tensor(v, dtype=torch.float64) for v in DELTAS] + [
            torch.tensor(LAYERWISE, dtype=torch.float64)]:
        torch.testing.assert_close(bound(d), la.log_marginal_likelihood(d), rtol=1e-12,
                                   atol=1e-10)
    # the data-partitioned bound agrees with PartitionedEvidence's exact per-partition fits
    parts = class_partitions(y if task == "classification" else torch.arange(12) % 3, 4,
                             torch.Generator().manual_seed(2))
    other = PartitionedEvidence(la, partition_batches(X, y, parts), structure="kernel")
    d = torch.tensor(0.7, dtype=torch.float64)
    torch.testing.assert_close(KernelBound(la, [(X, y)], parts)(d), other(d), rtol=1e-10,
                               atol=1e-10)
    # rows computed once and shared give the same bounds
    rows = function_space_rows(la, [(X, y)])
    torch.testing.assert_close(KernelBound(la, None, parts, True, "layers", rows=rows)(d),
                               KernelBound(la, [(X, y)], parts, True, "layers")(d), rtol=0, atol=0)
    # the diagonal bound is the exact diagonal structure's evidence
    diag = _fit(model, X, y, task, "diag")
    torch.testing.assert_close(KernelBound(la, [(X, y)], parameters="diag")(d),
                               diag.log_marginal_likelihood(d), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_every_partition_is_a_lower_bound_and_refinements_lower_it(task):
    """Fischer: on a δ grid, each bound ≤ exact log Z; nested data blocks (M = 2, 4, 12)
    increase with M; outputs-partitioned ≤ joint; diag ≤ tensors ≤ layers ≤ full."""
    model, X, y = _problem(task)
    la = _fit(model, X, y, task)
    data = [(X, y)]
    gen = 3  # the same ordering for every M: nested blocks
    bounds = {}
    for m in (2, 4, 12):
        parts = random_partitions(12, m, torch.Generator().manual_seed(gen))
        for outputs in (False, True):
            for par in ("diag", "tensors", "layers", None):
                bounds[m, outputs, par] = KernelBound(la, data, parts, outputs, par)
    grid = [torch.tensor(d, dtype=torch.float64) for d in DELTAS]
    grid.append(torch.tensor(LAYERWISE, dtype=torch.float64))
    for delta in grid:
        exact = la.log_marginal_likelihood(delta)
        v = {key: b(delta) for key, b in bounds.items()}
        torch.testing.assert_close(v[12, False, None], exact, rtol=1e-12, atol=1e-10)
        for key, value in v.items():
            assert value <= exact + 1e-10, key
        for outputs in (False, True):
            for par in ("diag", "tensors", "layers", None):
                assert v[2, outputs, par] <= v[4, outputs, par] + 1e-10
                assert v[4, outputs, par] <= v[12, outputs, par] + 1e-10
        for m in (2, 4, 12):
            for par in ("diag", "tensors", "layers", None):
                assert v[m, True, par] <= v[m, False, par] + 1e-10
            for outputs in (False, True):
                chain = [v[m, outputs, p] for p in ("diag", "tensors", "layers", None)]
                assert all(a <= b + 1e-10 for a, b in zip(chain, chain[1:]))
        assert v[2, True, "diag"] < exact - 1e-3  # strict with several blocks


def test_class_grouped_blocks_beat_random_ones_on_clustered_classes():
    """Not a theorem: an untrained network on three well-separated input clusters, where the
    kernel is largest within classes; class-grouped blocks against ten random groupings."""
    torch.manual_seed(0)
    n, c = 24, 3
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % c
    X = 3.0 * torch.randn(c, 3, generator=g, dtype=torch.float64)[y] \
        + 0.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, c)).double()
    la = marglik.Laplace(model, "classification", hessian_structure="full").fit([(X, y)])
    for m in (4, 8):
        for outputs in (False, True):
            for par in (None, "tensors", "diag"):
                grouped = KernelBound(la, [(X, y)], class_partitions(y, m), outputs, par)
                randoms = [KernelBound(la, [(X, y)], random_partitions(
                    n, m, torch.Generator().manual_seed(s)), outputs, par) for s in range(10)]
                for d in DELTAS:
                    delta = torch.tensor(d, dtype=torch.float64)
                    assert grouped(delta) > max(r(delta) for r in randoms), (m, outputs, par, d)


@pytest.mark.parametrize("parameters", [None, "diag"])
def test_stochastic_estimates_average_to_the_bound(parameters):
    model, X, y = _problem("classification")
    la = _fit(model, X, y, "classification")
    parts = random_partitions(12, 3, torch.Generator().manual_seed(0))  # B = 4, C = 3
    bound = KernelBound(la, [(X, y)], parts, outputs=True, parameters=parameters)
    delta = torch.tensor(0.8, dtype=torch.float64)
    target = bound(delta)
    for k in (1, 2, 4):
        subsets = list(itertools.combinations(range(4), k))
        mean = sum(bound.estimate(s, None, delta) for s in subsets) / len(subsets)
        torch.testing.assert_close(mean, target, rtol=1e-12, atol=1e-10)
        values = [bound.estimate(s, outs, delta) for s in subsets
                  for outs in itertools.product(range(3), repeat=k)]
        torch.testing.assert_close(sum(values) / len(values), target, rtol=1e-12, atol=1e-10)
    g = torch.Generator().manual_seed(0)
    drawn = bound(delta, sample=2, single_output=True, generator=g)
    assert any(torch.allclose(drawn, bound.estimate(s, o, delta), rtol=1e-14, atol=0)
               for s in itertools.permutations(range(4), 2)
               for o in itertools.product(range(3), repeat=2))
    # single output over all blocks: one output each, enumerated
    values = [bound.estimate(range(4), o, delta) for o in itertools.product(range(3), repeat=4)]
    torch.testing.assert_close(sum(values) / len(values), target, rtol=1e-12, atol=1e-10)


def _central_difference(fn, logs, eps=1e-6):
    out = torch.zeros_like(logs)
    for i in range(len(logs)):
        e = torch.zeros_like(logs)
        e[i] = eps
        out[i] = (fn(logs + e) - fn(logs - e)) / (2 * eps)
    return out


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize(("outputs", "parameters"),
                         [(False, None), (True, None), (False, "layers"), (True, "diag"),
                          (False, [["0.weight", "2.weight"], ["0.bias", "2.bias"]])])
def test_gradients_match_finite_differences(task, outputs, parameters):
    model, X, y = _problem(task)
    la = _fit(model, X, y, task)
    parts = random_partitions(12, 4, torch.Generator().manual_seed(0))
    bound = KernelBound(la, [(X, y)], parts, outputs, parameters)
    start = torch.tensor([0.3, 2.0, 0.7, 5.0, 0.6], dtype=torch.float64).log()
    if task == "classification":
        start = start[:4]

    def value(logs):
        sigma = logs[4].exp() if task == "regression" else None
        return bound(logs[:4].exp(), sigma)

    logs = start.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(value(logs), logs)
    torch.testing.assert_close(grad, _central_difference(value, start), rtol=1e-6, atol=1e-7)
    # a scalar δ as well
    s = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(bound(s.exp()), s)
    fd = _central_difference(lambda v: bound(v[0].exp()), s.detach().reshape(1))
    assert g.item() == pytest.approx(fd.item(), rel=1e-6)
    assert la.prior_precision.item() == 1.0  # nothing stored


def test_kfac_evidence_is_not_a_lower_bound():
    """A counterexample: a bias-free softmax layer where the input with the larger norm sits on
    the decision boundary (large Λ); KFAC's trace (Σ‖b‖²)(Σ‖a‖²)/N is then below the exact
    Σ‖b‖²‖a‖², and for large δ (log det ≈ trace/δ) its evidence lies above the exact one."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    X = torch.tensor([[10.0, 0.0], [0.1, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    kfac = marglik.Laplace(model, "classification", hessian_structure="kron").fit([(X, y)])
    delta = torch.tensor(10.0, dtype=torch.float64)
    exact = _oracle_bound(model, X, y, "classification", delta, [torch.arange(2)], False, None)
    assert kfac.log_marginal_likelihood(delta) > exact + 0.1


def test_model_is_left_as_it_was():
    model, X, y = _problem("classification")
    la = _fit(model, X, y, "classification")
    model.train()
    model[0].weight.requires_grad_(False)
    KernelBound(la, [(X, y)], outputs=True)
    assert model.training and model[2].training
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad


def test_partition_helpers():
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    parts = random_partitions(10, 4, g())
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert all(torch.equal(a, b) for a, b in zip(parts, random_partitions(10, 4, g())))
    # nested for multiples of M with the same seed
    big = random_partitions(10, 8, g())
    assert set(torch.cat(parts[:2]).tolist()) == set(big[0].tolist())
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 0])
    cls = class_partitions(labels, 2, g())
    assert [sorted(labels[p].tolist()) for p in cls] == [[0, 0], [0, 0], [1, 1], [1, 2], [2, 2]]
    assert sorted(torch.cat(cls).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="block size"):
        random_partitions(10, 0)
    with pytest.raises(ValueError, match="1-d integer"):
        class_partitions(labels.double(), 2)
    with pytest.raises(ValueError, match="two partitions"):
        check_partitions([torch.tensor([0, 1]), torch.tensor([1, 2])], 3)
    with pytest.raises(ValueError, match="missing"):
        check_partitions([torch.tensor([0, 1])], 3)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        check_partitions([torch.tensor([0, 1, 2, 3])], 3)
    with pytest.raises(ValueError, match="non-empty sequence"):
        check_partitions([], 3)
    with pytest.raises(ValueError, match="integer indices"):
        check_partitions([torch.tensor([0.0, 1.0, 2.0])], 3)


def test_bad_input():
    model, X, y = _problem("classification")
    la = _fit(model, X, y, "classification")
    data = [(X, y)]
    with pytest.raises(ValueError, match="same data"):
        KernelBound(la, [(X[:6], y[:6])])
    with pytest.raises(ValueError, match="either data or rows"):
        KernelBound(la, data, rows=function_space_rows(la, data))
    with pytest.raises(ValueError, match="rows must have shape"):
        KernelBound(la, None, rows=torch.zeros(12, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown parameter partition"):
        KernelBound(la, data, parameters="blocks")
    with pytest.raises(ValueError, match="partition the posterior's tensors"):
        KernelBound(la, data, parameters=[["0.weight"], ["2.weight"]])
    with pytest.raises(TypeError, match="outputs must be"):
        KernelBound(la, data, outputs="yes")
    with pytest.raises(ValueError, match="curvature='ggn'"):
        KernelBound(marglik.Laplace(model, "classification", curvature="ef").fit(data), data)
    with pytest.raises(RuntimeError):
        KernelBound(marglik.Laplace(model, "classification"), data)
    bound = KernelBound(la, data, random_partitions(12, 4))
    with pytest.raises(ValueError, match="sample must be"):
        bound(sample=4)
    with pytest.raises(ValueError, match="single_output needs output partitions"):
        bound(single_output=True)
    with pytest.raises(ValueError, match="distinct data blocks"):
        bound.estimate([0, 0])
    with pytest.raises(ValueError, match="single-output estimate needs"):
        bound.estimate([0], [1])
    with pytest.raises(ValueError, match="sigma_noise only applies"):
        bound(sigma_noise=torch.tensor(1.0))
    out = KernelBound(la, data, random_partitions(12, 4), outputs=True)
    with pytest.raises(ValueError, match="one output in"):
        out.estimate([0, 1], [0, 3])
