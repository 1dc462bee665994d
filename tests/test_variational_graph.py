"""Bayesian graph contrastive learning (marglik.variational.graph), the model side.

Float64 brute-force references on tiny graphs: Â against its dense formula written with loops,
the GCN layer against dense matrix products, the Gaussian KL against torch.distributions, the
contrastive log-likelihoods against per-node loops, the ELBO's gradients by gradcheck, and the
disagreement uncertainty on a hand-computed example.
"""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from marglik.errors import MarglikError
from marglik.variational.graph import (
    BayesianGCNLayer,
    GCNEncoder,
    GCNLayer,
    disagreement,
    drop_edges,
    elbo,
    gaussian_kl,
    info_nce_log_likelihood,
    mask_features,
    normalized_adjacency,
    nt_xent_log_likelihood,
    positive_likelihoods,
    undirected_edges,
)

# 6 nodes; (0, 1) listed twice and reversed, a self-loop (2, 2), node 5 isolated
EDGES = torch.tensor([[0, 1, 1, 2, 3, 2, 0], [1, 0, 2, 3, 4, 2, 1]])
N = 6


def dense_reference(edge_index, n):
    a = [[0.0] * n for _ in range(n)]
    for i, j in edge_index.T.tolist():
        if i != j:
            a[i][j] = a[j][i] = 1.0
    for i in range(n):
        a[i][i] = 1.0
    deg = [sum(row) for row in a]
    return torch.tensor([[a[i][j] / math.sqrt(deg[i] * deg[j]) for j in range(n)]
                         for i in range(n)])


def test_normalized_adjacency_equals_the_dense_formula():
    adj = normalized_adjacency(EDGES, N, dtype=torch.float64)
    assert adj.is_sparse and adj.shape == (N, N)
    assert adj._nnz() == 2 * 4 + N  # 4 distinct edges both ways + self-loops
    torch.testing.assert_close(adj.to_dense(), dense_reference(EDGES, N), rtol=0, atol=1e-15)
    assert adj.to_dense()[5, 5] == 1.0


def test_undirected_edges_are_distinct_and_ordered():
    assert undirected_edges(EDGES, N).tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]]


@pytest.mark.parametrize(("edges", "message"), [
    (torch.tensor([[0.0, 1.0], [1.0, 2.0]]), "integer"),
    (torch.tensor([0, 1, 2]), "shape"),
    (torch.tensor([[0, 6], [1, 2]]), "outside"),
    (torch.tensor([[-1, 0], [1, 2]]), "outside"),
])
def test_bad_edges_are_named(edges, message):
    with pytest.raises(MarglikError, match=message):
        normalized_adjacency(edges, N)


def test_gcn_layer_equals_dense_products_and_its_gradients():
    x = torch.randn(N, 3)
    layer = GCNLayer(3, 4)
    layer.bias.data.normal_()
    dense = dense_reference(EDGES, N)
    out = layer(x, normalized_adjacency(EDGES, N))
    ref = dense @ x @ layer.weight + layer.bias
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    g = torch.randn(N, 4)
    grad = torch.autograd.grad((out * g).sum(), layer.weight)[0]
    torch.testing.assert_close(grad, x.T @ dense.T @ g, rtol=1e-12, atol=1e-12)
    with pytest.raises(MarglikError, match="node features"):
        layer(torch.randn(N, 5), normalized_adjacency(EDGES, N))
    with pytest.raises(MarglikError, match="adjacency"):
        layer(x, torch.eye(N + 1))


def test_gaussian_kl_matches_torch_distributions():
    mu, sigma = torch.randn(4, 3), torch.rand(4, 3) + 0.1
    for s in (1.0, 0.3, torch.tensor(2.5)):
        ref = kl_divergence(Normal(mu, sigma), Normal(torch.zeros(4, 3), s)).sum()
        torch.testing.assert_close(gaussian_kl(mu, sigma, s), ref, rtol=1e-13, atol=1e-13)
    with pytest.raises(MarglikError, match="prior_std"):
        gaussian_kl(mu, sigma, 0.0)


def test_bayesian_layer_kl_and_reparameterised_draw():
    layer = BayesianGCNLayer(3, 2, prior_std=0.7, init_std=0.2)
    with torch.no_grad():
        layer.weight_rho.normal_()
        layer.bias_rho.normal_()
        layer.bias_mu.normal_()
    sw, sb = torch.nn.functional.softplus(layer.weight_rho), torch.nn.functional.softplus(
        layer.bias_rho)
    ref = (kl_divergence(Normal(layer.weight_mu, sw), Normal(0.0, 0.7)).sum()
           + kl_divergence(Normal(layer.bias_mu, sb), Normal(0.0, 0.7)).sum())
    torch.testing.assert_close(layer.kl(), ref, rtol=1e-13, atol=1e-13)
    w, b = layer.sample(torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    ew, eb = torch.randn(3, 2, generator=g), torch.randn(2, generator=g)
    torch.testing.assert_close(w, layer.weight_mu + sw * ew)
    torch.testing.assert_close(b, layer.bias_mu + sb * eb)
    assert w.requires_grad  # differentiable in μ and ρ
    fresh = BayesianGCNLayer(3, 2, init_std=0.05)
    torch.testing.assert_close(fresh.stds()[0], torch.full((3, 2), 0.05))


def test_deterministic_encoder_has_no_kl_and_draws_its_mean():
    enc = GCNEncoder(3, 4, 2)
    assert float(enc.kl()) == 0.0
    assert all(a[0] is b[0] for a, b in zip(enc.sample_weights(), enc.mean_weights()))
    venc = GCNEncoder(3, 4, 2, variational=True)
    assert float(venc.kl().detach()) > 0
    h = venc(torch.randn(N, 3), normalized_adjacency(EDGES, N))
    assert h.shape == (N, 2)


def test_augmentations_are_seeded_and_do_what_they_say():
    edges = torch.randint(0, 50, (2, 4000))
    kept = drop_edges(edges, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(kept, drop_edges(edges, 0.3, torch.Generator().manual_seed(1)))
    assert abs(kept.shape[1] / 4000 - 0.7) < 5 * math.sqrt(0.21 / 4000)
    assert torch.equal(drop_edges(edges, 0.0), edges)
    x = torch.randn(30, 200) + 5
    xm = mask_features(x, 0.4, torch.Generator().manual_seed(2))
    zero = (xm == 0).all(0)
    assert torch.equal(xm[:, ~zero], x[:, ~zero])  # one mask for all nodes
    assert abs(zero.double().mean() - 0.4) < 5 * math.sqrt(0.24 / 200)
    for bad in (1.0, -0.1, True):
        with pytest.raises(MarglikError, match="probability"):
            mask_features(x, bad)


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_contrastive_log_likelihoods_equal_per_node_loops():
    u, v, tau = torch.randn(5, 3), torch.randn(5, 3), 0.7
    info, grace = [], []
    for i in range(5):
        den = sum(math.exp(cos(u[i], v[k]) / tau) for k in range(5))
        info.append(cos(u[i], v[i]) / tau - math.log(den))

        def side(a, b, i=i):
            d = sum(math.exp(cos(a[i], b[k]) / tau) for k in range(5))
            d += sum(math.exp(cos(a[i], a[k]) / tau) for k in range(5) if k != i)
            return cos(a[i], b[i]) / tau - math.log(d)
        grace.append(0.5 * (side(u, v) + side(v, u)))
    torch.testing.assert_close(info_nce_log_likelihood(u, v, tau), torch.tensor(info),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nt_xent_log_likelihood(u, v, tau), torch.tensor(grace),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(MarglikError, match="same shape"):
        nt_xent_log_likelihood(u, v[:4], tau)
    with pytest.raises(MarglikError, match="tau"):
        info_nce_log_likelihood(u, v, 0.0)


def tiny_graph():
    x = torch.randn(5, 3)
    edges = torch.tensor([[0, 1, 2, 3, 0], [1, 2, 3, 4, 4]])
    return x, edges


class ELBOModule(torch.nn.Module):
    """The ELBO as a module's forward, so that torch.func.functional_call can swap weights."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x, edges, seed):
        g = torch.Generator().manual_seed(seed)  # the same ε and views at every call
        return elbo(self.encoder, x, edges, tau=0.8, n_samples=2, generator=g).elbo


def test_elbo_gradients_by_gradcheck():
    x, edges = tiny_graph()
    module = ELBOModule(GCNEncoder(3, 3, 2, variational=True, init_std=0.3, proj_dim=2))
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def fn(*ps):
        return torch.func.functional_call(module, dict(zip(names, ps)), (x, edges, 0))

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_elbo_is_the_contrastive_log_likelihood_minus_the_scaled_kl():
    x, edges = tiny_graph()
    enc = GCNEncoder(3, 4, 2)
    terms = elbo(enc, x, edges, p_edge=(0.0, 0.0), p_feature=(0.0, 0.0), tau=0.5)
    z = enc.project(enc.embed(x, normalized_adjacency(edges, 5)))
    torch.testing.assert_close(terms.log_lik, nt_xent_log_likelihood(z, z, 0.5).mean())
    assert float(terms.kl) == 0.0 and torch.equal(terms.elbo, terms.log_lik)
    venc = GCNEncoder(3, 4, 2, variational=True)
    t = elbo(venc, x, edges, kl_weight=0.3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t.elbo, t.log_lik - 0.3 * venc.kl() / 5)
    with pytest.raises(MarglikError, match="node features"):
        elbo(enc, torch.randn(5, 4), edges)
    with pytest.raises(MarglikError, match="n_samples"):
        elbo(enc, x, edges, n_samples=0)


def test_disagreement_on_a_hand_computed_example():
    # S = 2 weight draws, M = 2 positives, N = 2 nodes
    p = torch.tensor([[[0.2, 0.5], [0.6, 0.5]],
                      [[0.1, 0.3], [0.1, 0.9]]])
    # node 0: var(0.2, 0.6) = 0.04, var(0.1, 0.1) = 0 -> 0.02
    # node 1: var(0.5, 0.5) = 0, var(0.3, 0.9) = 0.09 -> 0.045
    torch.testing.assert_close(disagreement(p), torch.tensor([0.02, 0.045]))
    torch.testing.assert_close(disagreement(p[1]), torch.tensor([0.0, 0.09]))
    with pytest.raises(MarglikError, match="at least 2"):
        disagreement(p[:, :1])


def test_contrastive_likelihood_and_disagreement_by_hand():
    # anchors e1, e2; positive view A = (e1, e1), view B = (e1, e2); tau = 1
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    view_a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    view_b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pa = info_nce_log_likelihood(u, view_a, 1.0).exp()  # cosines (1, 1) and (0, 0): 1/2 each
    pb = info_nce_log_likelihood(u, view_b, 1.0).exp()  # e / (e + 1) each
    e = math.e
    torch.testing.assert_close(pa, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(pb, torch.tensor([e / (e + 1)] * 2))
    expected = ((e / (e + 1) - 0.5) / 2) ** 2
    torch.testing.assert_close(disagreement(torch.stack([pa, pb])),
                               torch.tensor([expected] * 2))


def test_positive_likelihoods_shapes_and_no_augmentation_means_no_disagreement():
    x, edges = tiny_graph()
    det = GCNEncoder(3, 4, 2)
    p = positive_likelihoods(det, x, edges, n_positives=3, n_weight_samples=4,
                             p_edge=0.0, p_feature=0.0)
    assert p.shape == (1, 3, 5) and ((p > 0) & (p < 1)).all()
    torch.testing.assert_close(disagreement(p), torch.zeros(5), rtol=0, atol=1e-15)
    var = GCNEncoder(3, 4, 2, variational=True, init_std=0.5)
    g = torch.Generator().manual_seed(0)
    p = positive_likelihoods(var, x, edges, n_positives=3, n_weight_samples=4, generator=g)
    assert p.shape == (4, 3, 5)
    assert (disagreement(p) > 0).all()
