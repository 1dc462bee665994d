"""Fast fit paths (issue 19) against float64 brute force.

- The softmax Hessian's C − 1 columns (Householder factor) reproduce Λ = diag(p) − p pᵀ.
- KFAC factors from lazily recorded inputs, per call, with the convolution identities
  (channel covariances per kernel offset, window sums for reduce; ``marglik.curvature.conv``)
  equal the definition computed here from ``F.unfold`` and from Jacobians w.r.t. the layer
  outputs (``torch.func``, hooks that add a zero perturbation to each output), with Λ from
  autograd: G = Σ_{n,r} J_{n,r}ᵀ Λ_n J_{n,r} (expand), Σ_n (Σ_r J_{n,r})ᵀ Λ_n (Σ_r J_{n,r})
  (reduce). Models: an MLP, a CNN (a stride-1 convolution large enough for the covariance
  identity, a strided one, 'same' padding), attention (the test-local re-implementation of
  ``tests/test_attention.py``) and a model with a silent (functional) layer.
- Full and diagonal GGNs equal ``oracle.ggn``, and the log evidence equals the brute-force
  formula with those matrices, for the same models.
- The sampled columns (``"ggn-sampled"``, ``"ggn-mc"``, one column per input) are unbiased:
  the mean over 300 seeds equals the exact GGN (and the exact KFAC factor G) within 5
  standard errors in every entry, and the spread of vᵀHv matches the variance stated in
  ``marglik.curvature.columns`` within 5 standard errors of the sample variance.
"""

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.curvature import conv
from marglik.curvature.columns import softmax_factor
from marglik.likelihoods.categorical import Categorical
from marglik.structures import Kronecker
from tests import oracle
from tests.test_attention import Encoder, reference
from tests.test_silent_layers import Functional

C = 4


@pytest.fixture(autouse=True)
def _float64():
    """float64, one thread, and the global random state left as it was (tests that run later
    draw their data from it)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield
    torch.set_default_dtype(dtype)


def rel_close(actual, expected, rtol=1e-10):
    scale = expected.abs().max().clamp_min(1e-300)
    err = float((actual - expected).abs().max() / scale)
    assert err <= rtol, err


# ------------------------------------------------------------------------------------ models
def mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, C))


class CNN(nn.Module):
    """conv1 (direct Gram), conv2 (stride 1, 16 channels on 8×8: the covariance identity),
    conv3 (stride 2: direct), a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding="same")
        self.conv3 = nn.Conv2d(16, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(64, C)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.head(h.flatten(1))


def make(name):
    torch.manual_seed(0)
    if name == "mlp":
        return mlp(), torch.randn(12, 5)
    if name == "cnn":
        return CNN(), torch.randn(12, 2, 8, 8)
    if name == "attention":
        return Encoder(), torch.randn(8, 4, 3)
    if name == "silent":
        return Functional(), torch.randn(12, 3)
    raise KeyError(name)


def targets(model, x):
    with torch.no_grad():
        f = model(x)
    return torch.randint(0, f.shape[-1], f.shape[:-1], generator=torch.Generator().manual_seed(1))


def fit(model, x, y, structure, batch_size=5, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KFAC's diagonal blocks, silent layers
        la = marglik.Laplace(model, "classification", hessian_structure=structure, **kw)
        return la.fit(DataLoader(TensorDataset(x, y), batch_size=batch_size))


# --------------------------------------------------------------------- brute-force KFAC
def layer_output_jacobians(model, x, modules):
    """Per sample, ∂f_n/∂(output of each module): list of (N, D_f, *out.shape[1:])."""
    shapes, perturb = {}, {}

    def shape_hook(m, args, out):
        shapes[m] = out.shape[1:]

    handles = [m.register_forward_hook(shape_hook) for m in modules]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()

    def add(m, args, out):
        return out + perturb[m]

    handles = [m.register_forward_hook(add) for m in modules]

    def f(eps, xi):
        for m, e in zip(modules, eps):
            perturb[m] = e.unsqueeze(0)
        return model(xi.unsqueeze(0)).reshape(-1)

    try:
        J = vmap(jacrev(f), in_dims=(None, 0))([torch.zeros(shapes[m]) for m in modules], x)
    finally:
        for h in handles:
            h.remove()
    return list(J)


def layer_inputs(model, x, modules):
    """Each module's input (N, ...) on x."""
    seen = {}
    handles = [m.register_forward_hook(lambda m, a, o: seen.__setitem__(m, a[0].detach()))
               for m in modules]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [seen[m] for m in modules]


def patches(module, a):
    """a (N, R, D_in): inputs of a Linear, or F.unfold of a Conv2d's input."""
    if isinstance(module, nn.Conv2d):
        pad = 0 if module.padding == "valid" else module.padding
        if pad == "same":
            total = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
            a = F.pad(a, (total[1] // 2, total[1] - total[1] // 2,
                          total[0] // 2, total[0] - total[0] // 2))
            pad = 0
        P = F.unfold(a, module.kernel_size, module.dilation, pad, module.stride)
        return P.transpose(1, 2)
    return a.reshape(a.shape[0], -1, a.shape[-1])


def kfac_definition(a, J, Lam, approx):
    """(A, G) from patches a (N, R, D_in), Jacobians J (N, D_f, D_out, R) and Λ (N, D_f, D_f)."""
    N, R = a.shape[:2]
    if approx == "expand":
        G = torch.einsum("nfor,nfg,ngpr->op", J, Lam, J)
        return torch.einsum("nri,nrj->ij", a, a) / (N * R), G
    Js = J.sum(-1)
    a_bar = a.mean(1)
    return a_bar.T @ a_bar / N, torch.einsum("nfo,nfg,ngp->op", Js, Lam, Js)


def output_hessians(model, x, y):
    with torch.no_grad():
        f = model(x)
    return oracle.output_hessians(oracle.categorical_nll, f, y)


def brute_force_kfac(model, x, y, modules, approx):
    """name -> (A, G) for Linear / Conv2d modules by the definition."""
    Lam = output_hessians(model, x, y)
    Js = layer_output_jacobians(model, x, modules)
    out = {}
    for m, a, J in zip(modules, layer_inputs(model, x, modules), Js):
        if isinstance(m, nn.Conv2d):  # (N, D_f, D_out, *spatial)
            J = J.reshape(*J.shape[:3], -1)
        else:  # Linear: (N, D_f, *positions, D_out)
            J = J.reshape(*J.shape[:2], -1, m.weight.shape[0]).transpose(2, 3)
        out[m] = kfac_definition(patches(m, a), J, Lam, approx)  # J: (N, D_f, D_out, R)
    return out


def dense(pieces):
    """Block-diagonal matrix of the given square blocks."""
    return torch.block_diag(*pieces)


def offsets(model):
    out, pos = {}, 0
    for n, p in model.named_parameters():
        out[n] = (pos, pos + p.numel())
        pos += p.numel()
    return out


# -------------------------------------------------------------------------------- columns
@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0])
def test_softmax_factor_has_c_minus_one_columns_and_gives_the_hessian(scale):
    f = torch.randn(30, 2, 7) * scale
    lik = Categorical()
    V = softmax_factor(lik, f)
    assert V.shape == (30, 2, 7, 6)
    rel_close(V @ V.transpose(-1, -2), lik.hessian(f), rtol=1e-13)


def test_softmax_factor_at_one_hot_and_two_classes():
    lik = Categorical()
    f = torch.tensor([[800.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-1e-3, 0.0, 1e-3]])
    V = softmax_factor(lik, f)
    assert torch.isfinite(V).all()
    torch.testing.assert_close(V @ V.transpose(-1, -2), lik.hessian(f), rtol=0, atol=1e-15)
    f2 = torch.randn(9, 2)
    V2 = softmax_factor(lik, f2)
    assert V2.shape == (9, 2, 1)
    rel_close(V2 @ V2.transpose(-1, -2), lik.hessian(f2), rtol=1e-13)


# ------------------------------------------------------------ convolution input statistics
GEOMETRIES = [  # (N, C, H, W, kernel, stride, dilation, padding as Conv2d takes it)
    (3, 2, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 3, 9, 7, (3, 2), (1, 1), (2, 1), (0, 2)),
    (2, 2, 6, 6, (3, 3), (1, 1), (1, 1), "same"),
    (2, 2, 6, 5, (2, 4), (1, 1), (1, 2), "same"),
    (2, 2, 7, 7, (3, 3), (1, 1), (1, 1), "valid"),
    (2, 2, 3, 3, (3, 3), (1, 1), (1, 1), (3, 3)),  # padding beyond the kernel's reach
    (3, 3, 9, 6, (2, 3), (2, 1), (1, 2), (1, 0)),
    (2, 2, 7, 7, (3, 3), (2, 2), (1, 1), (1, 1)),
]


def _unfolded(x, kernel, stride, dilation, padding):
    m = nn.Conv2d(x.shape[1], 1, kernel, stride, padding, dilation)
    return patches(m, x)  # (N, R, D_in)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_patch_gram_and_sums_equal_the_unfolded_patches(geometry):
    N, Cin, H, W, kernel, stride, dilation, padding = geometry
    x = torch.randn(N, Cin, H, W)
    a = _unfolded(x, kernel, stride, dilation, padding)
    pads = conv.explicit_padding(padding, kernel, dilation)
    A = torch.einsum("nri,nrj->ij", a, a)
    rel_close(conv.direct_patch_gram(x, kernel, stride, dilation, pads), A, 1e-13)
    rel_close(conv.patch_gram(x, kernel, stride, dilation, pads), A, 1e-13)
    if stride == (1, 1):
        rel_close(conv.correlated_patch_gram(x, kernel, dilation, pads), A, 1e-13)
    rel_close(conv.conv_patch_sums(x, kernel, stride, dilation, pads), a.sum(1), 1e-13)
    rel_close(conv.unfold(x, kernel, stride, dilation, pads), a.transpose(1, 2), 0)


def test_patch_gram_takes_the_covariance_route_for_large_maps():
    x = torch.randn(8, 16, 8, 8)
    pads = (1, 1, 1, 1)
    calls = []
    original = conv.correlated_patch_gram
    conv.correlated_patch_gram = lambda *a: calls.append(1) or original(*a)
    try:
        A = conv.patch_gram(x, (3, 3), (1, 1), (1, 1), pads)
    finally:
        conv.correlated_patch_gram = original
    assert calls  # the identity was used, and it is exact
    a = _unfolded(x, (3, 3), (1, 1), (1, 1), (1, 1))
    rel_close(A, torch.einsum("nri,nrj->ij", a, a), 1e-13)


def test_conv1d_kfac_uses_the_same_identities():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 5, 3, padding=2, dilation=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(5 * 10, C))
    x = torch.randn(9, 3, 10)
    y = targets(model, x)
    twin = nn.Conv2d(3, 5, (3, 1), padding=(2, 0), dilation=(2, 1))  # the same map in 2-d
    for approx in ("expand", "reduce"):
        la = fit(model, x, y, "kron", kfac_approx=approx)
        Lam = output_hessians(model, x, y)
        (J,) = layer_output_jacobians(model, x, [model[0]])
        a = patches(twin, x.unsqueeze(-1))
        A, G = kfac_definition(a, J, Lam, approx)
        block = la.H.blocks[0]
        assert isinstance(block, Kronecker)
        rel_close(block.to_dense(), torch.kron(G, A))


# ------------------------------------------------------------------- KFAC, full, diag, evidence
MODELS = ["mlp", "cnn", "attention", "silent"]


def registered_modules(name, model):
    if name == "mlp":
        return [model[0], model[2], model[4]]
    if name == "cnn":
        return [model.conv1, model.conv2, model.conv3, model.head]
    if name == "silent":
        return [model.out]
    return [model.emb, model.enc.linear1, model.enc.linear2, model.head]


def attention_kfac(model, x, y, approx):
    """(A, G) of in_proj and out_proj by the definition, from tests/test_attention's
    re-implementation (perturbations added to the projections' outputs)."""
    from tests.test_attention import E, L

    Lam = output_hessians(model, x, y)

    def f(e_qkv, e_out, xi):
        return reference(model, xi.unsqueeze(0), e_qkv.unsqueeze(0), e_out.unsqueeze(0))[0][0]

    J_in, J_out = vmap(jacrev(f, argnums=(0, 1)), in_dims=(None, None, 0))(
        torch.zeros(L, 3 * E), torch.zeros(L, E), x)
    _, _, attn = reference(model, x)
    a_in = model.emb(x).detach()
    return {part: kfac_definition(a, J.transpose(2, 3), Lam, approx)
            for part, a, J in (("in_proj", a_in, J_in), ("out_proj", attn, J_out))}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", MODELS)
def test_kfac_factors_equal_the_definition(name, approx):
    model, x = make(name)
    y = targets(model, x)
    la = fit(model, x, y, "kron", kfac_approx=approx)
    H = la.H.to_dense()
    at = offsets(model)
    names = {p: n for n, p in model.named_parameters()}
    for m, (A, G) in brute_force_kfac(model, x, y, registered_modules(name, model),
                                      approx).items():
        (w0, w1), (b0, b1) = at[names[m.weight]], at[names[m.bias]]
        rel_close(H[w0:w1, w0:w1], torch.kron(G, A))
        rel_close(H[b0:b1, b0:b1], G)
    if name == "attention":
        for part, (A, G) in attention_kfac(model, x, y, approx).items():
            prefix = "enc.self_attn." + ("in_proj_" if part == "in_proj" else "out_proj.")
            (w0, w1), (b0, b1) = at[prefix + "weight"], at[prefix + "bias"]
            rel_close(H[w0:w1, w0:w1], torch.kron(G, A))
            rel_close(H[b0:b1, b0:b1], G)
    if name == "silent":  # the functional layer: its exact diagonal
        exact = oracle.ggn(model, x, y, oracle.categorical_nll).diagonal()
        for n in ("lin.weight", "lin.bias"):
            s, t = at[n]
            rel_close(H[s:t, s:t], torch.diag(exact[s:t]))


@pytest.mark.parametrize("name", MODELS)
def test_full_and_diag_ggn_and_evidence_equal_brute_force(name):
    model, x = make(name)
    y = targets(model, x)
    H = oracle.ggn(model, x, y, oracle.categorical_nll)
    with torch.no_grad():
        log_lik = -oracle.categorical_nll(model(x), y)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    delta = torch.tensor(0.7)
    full = fit(model, x, y, "full")
    diag = fit(model, x, y, "diag")
    rel_close(full.H.to_dense(), H)
    rel_close(diag.H.diag(), H.diagonal())
    for la, H_bf in ((full, H), (diag, torch.diag(H.diagonal()))):
        expected = oracle.laplace_evidence(log_lik, theta, H_bf, delta)
        actual = la.log_marginal_likelihood(prior_precision=delta)
        assert abs(float(actual - expected)) <= 1e-9 * abs(float(expected))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_kfac_evidence_equals_brute_force(name, approx):
    model, x = make(name)
    y = targets(model, x)
    la = fit(model, x, y, "kron", kfac_approx=approx)
    pieces = []
    for A, G in brute_force_kfac(model, x, y, registered_modules(name, model),
                                 approx).values():
        pieces += [torch.kron(G, A), G]
    H_bf = dense(pieces)
    with torch.no_grad():
        log_lik = -oracle.categorical_nll(model(x), y)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    delta = torch.tensor(1.3)
    expected = oracle.laplace_evidence(log_lik, theta, H_bf, delta)
    actual = la.log_marginal_likelihood(prior_precision=delta)
    assert abs(float(actual - expected)) <= 1e-9 * abs(float(expected))


def test_kfac_with_output_positions_keeps_the_likelihoods_own_columns():
    """Per-token outputs: KFAC stacks each column over the positions, so G depends on the
    factor; it stays the likelihood's V = diag(√p) − p √pᵀ (C columns), as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, C))
    x = torch.randn(7, 5, 3)
    y = targets(model, x)
    la = fit(model, x, y, "kron")
    with torch.no_grad():
        f = model(x)
    V = Categorical().hessian_factor(f)  # (N, L, C, C)
    (J,) = layer_output_jacobians(model, x, [model[2]])  # (N, L·C, L, C)
    J = J.reshape(7, 5, C, 5, C)
    b = torch.einsum("nscro,nsck->knro", J, V)  # columns stacked over output positions s
    G = torch.einsum("knro,knrp->op", b, b)
    rel_close(la.H.blocks[3].to_dense(), G)  # the bias block of the head is G itself


def test_lazily_recorded_inputs_modified_in_place_raise():
    """Never a silently wrong A: autograd's own version check fires on the first batch (the
    silent-layer check backpropagates to the weights), the recorder's on later ones."""

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.lin(x)
            x.mul_(2)  # the recorded input of lin changes after lin ran
            return self.out(torch.tanh(h))

    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        fit(InPlace(), x, y, "kron")
    model = InPlace()
    batches = [(x[:3].clone(), y[:3]), (x[3:].clone(), y[3:])]
    first = batches[0][0].clone()

    class Once:  # the first batch unchanged (as if it were not modified), then in place
        def __iter__(self):
            model.forward = lambda t: model.out(torch.tanh(model.lin(t)))
            yield first, batches[0][1]
            del model.forward
            yield batches[1]

    with pytest.raises(RuntimeError, match="modified in place after the layer used it"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            marglik.Laplace(model, "classification").fit(Once())


def test_outputs_overwritten_in_place_on_a_later_batch_are_recorded_again():
    """A fit passes recorded layer outputs on uncopied; an in-place operation on one (here only
    on the last batch) is detected and that batch's forward pass redone with a copy. Without
    it the gradients would be taken w.r.t. the overwritten tensor (tanh(h), not h)."""

    class LaterInPlace(nn.Module):
        def __init__(self, inplace: bool):
            super().__init__()
            self.lin, self.out, self.inplace = nn.Linear(3, 4), nn.Linear(4, 3), inplace

        def forward(self, x):
            h = self.lin(x)
            return self.out(h.tanh_() if self.inplace and x.shape[0] == 2 else h.tanh())

    torch.manual_seed(0)
    model, twin = LaterInPlace(True), LaterInPlace(False)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(10, 3) * 2
    y = targets(twin, x)
    exact = oracle.ggn(twin, x, y, oracle.categorical_nll).diagonal()
    rel_close(fit(model, x, y, "diag", batch_size=4).H.diag(), exact)
    rel_close(fit(model, x, y, "kron", batch_size=4).H.to_dense(),
              fit(twin, x, y, "kron", batch_size=4).H.to_dense())
    assert all(not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------- sampled columns
SEEDS = 300


@functools.lru_cache
def _sampled_fits(curvature, structure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(6, 3) * 2
    y = targets(model, x)
    fits = torch.stack([fit(model, x, y, structure, curvature=curvature, seed=s).H.to_dense()
                        for s in range(SEEDS)])
    return model, x, y, fits


def _within_standard_errors(samples, exact, z=5.0):
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    bad = (mean - exact).abs() > z * se + 1e-12 * exact.abs().max()
    assert not bad.any(), float(((mean - exact).abs() / se.clamp_min(1e-300))[bad].max())


@pytest.mark.parametrize("curvature", ["ggn-sampled", "ggn-mc"])
def test_one_sampled_column_is_unbiased_for_the_ggn(curvature):
    model, x, y, fits = _sampled_fits(curvature, "full")
    _within_standard_errors(fits, oracle.ggn(model, x, y, oracle.categorical_nll))
    exact = fit(model, x, y, "kron").H.to_dense()
    kfac = torch.stack([fit(model, x, y, "kron", curvature=curvature, seed=s).H.to_dense()
                        for s in range(SEEDS)])
    _within_standard_errors(kfac, exact)  # E[G] ⊗ A: A does not depend on the columns


@pytest.mark.parametrize("curvature", ["ggn-sampled", "ggn-mc"])
def test_the_variance_of_one_sampled_column_is_the_stated_one(curvature):
    model, x, y, fits = _sampled_fits(curvature, "full")
    v = torch.randn(fits.shape[-1], generator=torch.Generator().manual_seed(3))
    q = torch.einsum("p,spq,q->s", v, fits, v)
    w = oracle.jacobians(model, x) @ v  # (N, C): w_n = J_n v
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    quad = torch.einsum("nc,ncd,nd->n", w, Lam, w)
    if curvature == "ggn-sampled":  # z = Vᵀw, V = diag(√p) − p √pᵀ: 2(‖z‖⁴ − Σ z⁴)
        V = torch.diag_embed(p.sqrt()) - p[:, :, None] * p.sqrt()[:, None, :]
        z = torch.einsum("ncd,nc->nd", V, w)
        stated = (2 * (z.square().sum(-1).square() - z.pow(4).sum(-1))).sum()
    else:  # Σ_y p_y (wᵀ(p − e_y))⁴ − (wᵀΛw)²
        wp = (w * p).sum(-1, keepdim=True)
        stated = ((p * (wp - w).pow(4)).sum(-1) - quad.square()).sum()
    S = q.shape[0]
    var = q.var()
    m4 = (q - q.mean()).pow(4).mean()
    se_var = math.sqrt(max(float(m4 - var.square() * (S - 3) / (S - 1)), 0.0) / S)
    assert abs(float(var - stated)) <= 5 * se_var, (float(var), float(stated), se_var)
    torch.testing.assert_close(q.mean(), quad.sum(), rtol=5 * float(q.std()) / math.sqrt(S)
                               / float(quad.sum()), atol=0)


# ------------------------------------------------- parameters outside layers: their owners
class Normalised(nn.Module):
    """Eval-mode BatchNorm and LayerNorm (owners recorded like layers), and a parameter of the
    model itself (whole-model path)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.ln, self.head = nn.LayerNorm(16), nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.tensor([1.3]))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.head(self.ln(h)) * self.scale


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_owners_of_other_parameters_give_their_exact_diagonal(structure, monkeypatch):
    torch.manual_seed(0)
    model = Normalised().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        for p in (model.bn.weight, model.bn.bias, model.ln.weight, model.ln.bias):
            p.uniform_(-1, 1)
    x = torch.randn(10, 2, 4, 4)
    y = targets(model, x)
    import marglik.curvature.accumulators as acc

    whole_model = []
    original = acc.per_sample_column_grads
    monkeypatch.setattr(acc, "per_sample_column_grads",
                        lambda m, sub, *a: whole_model.append(sub.names) or original(m, sub, *a))
    la = fit(model, x, y, structure, batch_size=4)
    assert whole_model and all(names == ["scale"] for names in whole_model)  # only the root's
    exact = oracle.ggn(model, x, y, oracle.categorical_nll).diagonal()
    at = offsets(model)
    diag = la.H.to_dense().diagonal()
    for name in ("bn.weight", "bn.bias", "ln.weight", "ln.bias", "scale"):
        s, t = at[name]
        rel_close(diag[s:t], exact[s:t])
    if structure == "diag":
        rel_close(diag, exact)
