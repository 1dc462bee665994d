"""The fast paths behind ResNet-scale KFAC on a CPU (issue 19), each against brute force.

- one backward pass per output column (the CPU default) and the vmapped pass both give
  Σ_c U_{k,n,c} ∂f_{n,c}/∂h (``torch.func.jacrev``), into reused buffers too;
- closed-form per-sample gradients of BatchNorm (eval), LayerNorm and GroupNorm equal the
  per-sample vjps of the module (``torch.func``), and a BatchNorm on batch statistics is left to
  the generic path;
- the KFAC output Gram Σ b bᵀ of a convolution, as rows or batched products;
- a small ResNet (a BasicBlock, BatchNorm in eval mode): the BatchNorm diagonal blocks of a KFAC
  fit (closed forms) against the exact GGN from dense Jacobians.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.curvature.backprop import backprop_columns
from marglik.curvature.kfac import Rows, as_matrix, output_gram
from marglik.curvature.norms import norm_sample_gradients
from tests import oracle


# ------------------------------------------------------------------------ column backprop
def _split_model():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh())
    tail = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.Softplus(),
                         nn.Flatten(), nn.Linear(16, 5)).eval()
    with torch.no_grad():
        tail[1].running_mean.uniform_(-1, 1)
        tail[1].running_var.uniform_(0.5, 2)
    return head, tail


@pytest.mark.parametrize("batched", [False, True])
def test_backprop_columns_equals_jacobian_contraction(batched):
    head, tail = _split_model()
    x = torch.randn(6, 2, 5, 5)
    h = head(x).detach().requires_grad_(True)
    unused = torch.randn(6, 7, requires_grad=True)
    f = tail(h)
    U = torch.randn(4, *f.shape)
    J = vmap(jacrev(lambda hn: tail(hn[None])[0]))(h)  # (N, C, *h[0].shape)
    expected = torch.einsum("knc,nc...->kn...", U, J)
    stale = [torch.full((4, *h.shape), float("nan")), torch.full((4, 6, 7), float("nan"))]
    for out in (None, stale):  # fresh buffers, and reused ones holding garbage
        gh, gu = backprop_columns(f, [h, unused], U, batched=batched, out=out)
        torch.testing.assert_close(gh, expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(gu, torch.zeros(4, 6, 7))
    if not batched:  # the reused buffers were written into, not replaced
        assert gh.data_ptr() == stale[0].data_ptr()


def test_backprop_columns_keeps_a_mismatched_buffer_out():
    head, tail = _split_model()
    h = head(torch.randn(3, 2, 5, 5)).detach().requires_grad_(True)
    f = tail(h)
    U = torch.randn(2, *f.shape)
    wrong = torch.zeros(2, 3, 3, 5, 4)  # other shape: not used
    (g,) = backprop_columns(f, [h], U, batched=False, out=[wrong])
    assert g.data_ptr() != wrong.data_ptr() and torch.equal(wrong, torch.zeros_like(wrong))
    ref = backprop_columns(f, [h], U, batched=True)[0]
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ normalisation layers
def _norms():
    bn2, bn1 = nn.BatchNorm2d(4), nn.BatchNorm1d(4)
    for bn in (bn2, bn1):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return [
        (bn2.eval(), torch.randn(5, 4, 3, 2)),
        (bn1.eval(), torch.randn(5, 4)),
        (bn1.eval(), torch.randn(5, 4, 6)),
        (nn.LayerNorm((3, 4)), torch.randn(5, 2, 3, 4)),
        (nn.LayerNorm(4), torch.randn(5, 4)),
        (nn.GroupNorm(2, 4), torch.randn(5, 4, 3)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_norm_closed_forms_equal_per_sample_vjps(case):
    torch.manual_seed(case)
    module, x = _norms()[case]
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1, 1)
    K = 3
    b = torch.randn(K, *x.shape)
    params = {n: p.detach() for n, p in module.named_parameters()}

    def one(p, xn):
        return functional_call(module, p, (xn[None],))[0]

    J = vmap(jacrev(one), in_dims=(None, 0))(params, x)  # name -> (N, *out, *shape)
    got = norm_sample_gradients(module, (x,), b, list(params))
    assert got is not None
    for name, Jn in J.items():  # Σ_o b_{k,n,o} ∂y_{n,o}/∂θ
        ref = torch.einsum("kno,nop->knp", b.flatten(2),
                           Jn.reshape(x.shape[0], -1, params[name].numel()))
        torch.testing.assert_close(got[name], ref, rtol=1e-12, atol=1e-12)


def test_norm_closed_form_declines_batch_statistics_and_other_modules():
    bn = nn.BatchNorm2d(4).train()
    x, b = torch.randn(5, 4, 3, 3), torch.randn(2, 5, 4, 3, 3)
    assert norm_sample_gradients(bn, (x,), b, ["weight", "bias"]) is None
    untracked = nn.BatchNorm2d(4, track_running_stats=False).eval()
    assert norm_sample_gradients(untracked, (x,), b, ["weight"]) is None
    assert norm_sample_gradients(nn.Linear(3, 3), (x,), b, ["weight"]) is None


# ------------------------------------------------------------------------ output Gram
@pytest.mark.parametrize("C,R", [(3, 20), (8, 4)])  # batched products, and rows
def test_output_gram_of_channels_first_gradients(C, R):
    g = torch.randn(3, 4, C, R)  # (K, N, D_out, R), contiguous as a convolution's
    b = g.transpose(-1, -2)  # (K, N, R, D_out), a view
    G = output_gram(b)
    assert isinstance(G, Rows) == (R < C)
    torch.testing.assert_close(as_matrix(G), torch.einsum("knrd,knre->de", b, b),
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ a small ResNet
class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                   nn.BatchNorm2d(c_out))

    def forward(self, h):
        out = torch.relu(self.bn1(self.conv1(h)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(h))


def tiny_resnet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3),
                          nn.ReLU(), Block(3, 4, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def test_tiny_resnet_batchnorm_diagonal_is_the_exact_ggn_diagonal(monkeypatch):
    import marglik.curvature.local as local

    def no_generic(*args):
        raise AssertionError("BatchNorm took the generic torch.func path")

    monkeypatch.setattr(local.OwnerRecord, "_generic", no_generic)  # closed forms only
    model = tiny_resnet()
    x = torch.randn(7, 2, 6, 6)
    y = torch.randint(0, 3, (7,))
    la = marglik.Laplace(model, "classification", hessian_structure="kron")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm: diagonal blocks
        la.fit(DataLoader(TensorDataset(x, y), batch_size=3))
    exact = oracle.ggn(model, x, y, oracle.categorical_nll)
    diag = la.H.to_dense().diagonal()
    start = 0
    for name, p in model.named_parameters():
        stop = start + p.numel()
        if ".bn" in f".{name}" or "short.1" in name or name.startswith("1."):
            torch.testing.assert_close(diag[start:stop], exact.diagonal()[start:stop],
                                       rtol=1e-10, atol=1e-12)
        start = stop


def _fitted_tiny_resnet(structure="kron"):
    model = tiny_resnet()
    x = torch.randn(7, 2, 6, 6)
    y = torch.randint(0, 3, (7,))
    la = marglik.Laplace(model, "classification", hessian_structure=structure)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm: diagonal blocks
        la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    la.prior_precision = torch.rand(len(la.subset.names), generator=torch.Generator()
                                    .manual_seed(1)) + 0.5  # layer-wise δ
    return la


@pytest.mark.parametrize("structure", ["kron", "diag"])
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("block", [None, 40])
def test_layerwise_predictive_of_a_resnet_equals_brute_force(structure, chunk_size, block,
                                                              monkeypatch):
    """J Σ Jᵀ per input against dense Jacobians and the inverse of the explicit precision; the
    BatchNorm tensors' Jacobians come from their recorded owners (closed forms), not from
    whole-model torch.func Jacobians; with ``block`` the conv Jacobians are formed a few weight
    rows at a time."""
    import marglik.posterior.layerwise as layerwise
    import marglik.posterior.layerwise_covariance as covariance

    if block is not None:
        monkeypatch.setattr(covariance, "MAX_JACOBIAN_BLOCK", block)

    la = _fitted_tiny_resnet(structure)
    xt = torch.randn(5, 2, 6, 6)
    whole_model = []
    original = layerwise.per_sample_jacobians
    monkeypatch.setattr(layerwise, "per_sample_jacobians",
                        lambda m, sub, *a: whole_model.append(sub.names) or original(m, sub, *a))
    f, cov = la.functional_moments(xt, chunk_size=chunk_size, backend="layerwise")
    assert not whole_model
    J = oracle.jacobians(la.model, xt, la.subset.names)
    Sigma = torch.linalg.inv(la.posterior_precision)
    torch.testing.assert_close(cov, J @ Sigma @ J.mT, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(f, la.model(xt))
    probs = la(xt, link_approx="probit", chunk_size=chunk_size)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))


def test_layerwise_predictive_falls_back_for_an_owner_whose_parameter_is_used_elsewhere(
        monkeypatch):
    """A parameter used outside its owner's forward: the owner's recording misses that use, the
    first chunk's check sees it, and the tensor takes whole-model torch.func Jacobians (exact:
    equal to the generic backend's covariance); the BatchNorm keeps its recorded owner."""
    import marglik.posterior.layerwise as layerwise

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.tensor([0.7, 1.2, -0.4]))

        def forward(self, h):
            return h * self.weight[:, None, None]

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.scale = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), Scale()
            self.head = nn.Linear(3, 2)

        def forward(self, h):
            h = self.scale(self.bn(self.conv(h))).mean((2, 3))
            return self.head(h * self.scale.weight)  # used again, outside Scale.forward

    torch.manual_seed(0)
    model = Tied().eval()
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 2, (6,))
    la = marglik.Laplace(model, "classification", hessian_structure="diag")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=6))
    whole_model = []
    original = layerwise.per_sample_jacobians
    monkeypatch.setattr(layerwise, "per_sample_jacobians",
                        lambda m, sub, *a: whole_model.append(sub.names) or original(m, sub, *a))
    xt = torch.randn(3, 2, 4, 4)
    _, cov = la.functional_moments(xt, backend="layerwise")
    assert whole_model == [["scale.weight"]]
    J = oracle.jacobians(la.model, xt, la.subset.names)
    Sigma = torch.linalg.inv(la.posterior_precision)
    torch.testing.assert_close(cov, J @ Sigma @ J.mT, rtol=1e-9, atol=1e-12)
