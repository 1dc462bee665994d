"""``nn.MultiheadAttention`` in the layer registry: KFAC for its projections, exact elsewhere.

A tiny ``nn.TransformerEncoderLayer`` (d_model 8, 2 heads, feed-forward 16) between a Linear
embedding and a Linear head, with mean-pooled or per-token outputs, batch_first True and False,
without a mask, with a key padding mask and with a causal attention mask. Checked in float64
against brute force (tests/oracle.py) and against a test-local re-implementation of the layer
from its parameters (independent of torch's attention code and of marglik's recording):

- ``"diag"`` and ``"full"`` equal the brute-force GGN;
- ``"kron"``: the attention projections (packed ``in_proj_weight`` as one map with 3·d outputs,
  ``out_proj``) equal the KFAC-expand / -reduce definition (Eschenhagen et al., NeurIPS 2023)
  computed by hand from the re-implementation's token inputs and output gradients; LayerNorm
  parameters get exact diagonal blocks;
- the GLM variance of the layer-wise backend equals the generic backend and J Σ Jᵀ, and the log
  evidence equals the brute-force formula, to 1e-8 relative;
- the explicit attention used while recording equals torch's fast paths, and the model is left
  exactly as it was.
"""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.curvature.builtin_layers import mha_forward
from marglik.curvature.layers import LayerRecorder, layer_map
from marglik.curvature.subsets import select_subset
from marglik.predictive import glm_moments
from marglik.structures import Diagonal, Kronecker
from tests import oracle

E, HEADS, FF, L, D_IN, C = 8, 2, 16, 4, 3, 3


def padding_mask(x):
    """Tokens with a large first input are padding (never the first token)."""
    return torch.cat([torch.zeros_like(x[:, :1, 0], dtype=torch.bool), x[:, 1:, 0] > 0.5], 1)


class Encoder(nn.Module):
    def __init__(self, batch_first=True, per_token=False, mask=None, layers=1):
        super().__init__()
        self.batch_first, self.per_token, self.mask = batch_first, per_token, mask
        self.emb = nn.Linear(D_IN, E)
        layer = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, batch_first=batch_first)
        self.enc = layer if layers == 1 else nn.TransformerEncoder(
            layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(E, C)

    def forward(self, x):
        h = self.emb(x)
        kpm = padding_mask(x) if self.mask == "padding" else None
        causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype) \
            if self.mask == "causal" else None
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h, causal, src_key_padding_mask=kpm)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h if self.per_token else h.mean(1))


CASES = {
    "bf-pooled": dict(batch_first=True),
    "sf-pooled-padding": dict(batch_first=False, mask="padding"),
    "bf-tokens-padding": dict(batch_first=True, per_token=True, mask="padding"),
    "sf-tokens-causal": dict(batch_first=False, per_token=True, mask="causal"),
    "bf-pooled-causal": dict(batch_first=True, mask="causal"),
    "bf-encoder-padding": dict(batch_first=True, mask="padding", layers=2),
}


def setup(case, task="regression", n=6):
    model = Encoder(**CASES[case])
    x = torch.randn(n, L, D_IN)
    with torch.no_grad():
        f = model(x)
    y = torch.randint(0, C, f.shape[:-1]) if task == "classification" else torch.randn(f.shape)
    return model, x, y


def fit(model, x, y, task, structure, **kw):
    """A fit on batches of 4 = L tokens (sequence-first inputs are then (4, 4, E): ambiguous)."""
    sigma = {"sigma_noise": 0.7} if task == "regression" else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # KFAC cannot express the LayerNorms
        la = marglik.Laplace(model, task, hessian_structure=structure, **sigma, **kw)
        la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    assert not [w for w in caught if "cannot be recorded" in str(w.message)]  # all recorded
    return la


def nll(task):
    return oracle.categorical_nll if task == "classification" else oracle.gaussian_nll(0.7)


def rel_close(actual, expected, rtol=1e-8):
    scale = expected.abs().max().clamp_min(1e-300)
    err = float((actual - expected).abs().max() / scale)
    assert err <= rtol, err


def offsets(model):
    out, pos = {}, 0
    for n, p in model.named_parameters():
        out[n] = (pos, pos + p.numel())
        pos += p.numel()
    return out


# ------------------------------------------------------------------ test-local re-implementation
def reference(model, x, e_qkv=None, e_out=None, e_ff=None):
    """The model (one post-norm encoder layer) written out from its parameters, batch first.

    Returns the outputs and the token inputs of the projections: x into in_proj (N, L, E) and
    the attention output into out_proj (N, L, E). ``e_qkv`` (N, L, 3E) and ``e_out`` (N, L, E)
    are added to the projections' outputs, so gradients w.r.t. them are the output gradients b
    (``e_ff`` (N, L, FF) likewise for ``linear1``, whose input is returned third).
    """
    layer, mha = model.enc, model.enc.self_attn
    N, hd = x.shape[0], E // HEADS
    h = model.emb(x)
    qkv = h @ mha.in_proj_weight.T + mha.in_proj_bias
    if e_qkv is not None:
        qkv = qkv + e_qkv

    def split(t):
        return t.reshape(N, L, HEADS, hd).transpose(1, 2)

    q, k, v = (split(t) for t in qkv.chunk(3, -1))
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if model.mask == "causal":
        s = s + torch.triu(torch.full((L, L), -math.inf), 1)
    if model.mask == "padding":
        s = s.masked_fill(padding_mask(x)[:, None, None, :], -math.inf)
    attn = (s.softmax(-1) @ v).transpose(1, 2).reshape(N, L, E)
    sa = attn @ mha.out_proj.weight.T + mha.out_proj.bias
    if e_out is not None:
        sa = sa + e_out
    h = layer.norm1(h + sa)
    h1 = h.detach()
    ff = layer.linear1(h)
    if e_ff is not None:
        ff = ff + e_ff
    h = layer.norm2(h + layer.linear2(torch.relu(ff)))
    f = model.head(h if model.per_token else h.mean(1))
    return f, h1, attn.detach()


def kfac_by_hand(model, x, approx):
    """G ⊗ A of in_proj, out_proj and linear1 from the definition, Gaussian likelihood
    (σ = 0.7), from the re-implementation's batch-first token inputs and output gradients."""
    N = x.shape[0]
    e_qkv = torch.zeros(N, L, 3 * E, requires_grad=True)
    e_out = torch.zeros(N, L, E, requires_grad=True)
    e_ff = torch.zeros(N, L, FF, requires_grad=True)
    f, h1, attn = reference(model, x, e_qkv, e_out, e_ff)
    a_in = model.emb(x).detach()
    blocks = {}
    b_in, b_out, b_ff = [], [], []
    for k in range(C):  # columns of V = I/σ, stacked over positions for per-token outputs
        g_in, g_out, g_ff = torch.autograd.grad(f[..., k].sum() / 0.7, [e_qkv, e_out, e_ff],
                                                retain_graph=True)
        b_in.append(g_in)
        b_out.append(g_out)
        b_ff.append(g_ff)
    for name, a, b in (("in_proj", a_in, torch.stack(b_in)),
                       ("out_proj", attn, torch.stack(b_out)),
                       ("linear1", h1, torch.stack(b_ff))):
        if approx == "expand":
            a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            A, G = a2.T @ a2 / (N * L), b2.T @ b2
        else:
            a_bar, b_sum = a.mean(1), b.sum(2).reshape(-1, b.shape[-1])
            A, G = a_bar.T @ a_bar / N, b_sum.T @ b_sum
        bias = G
        blocks[name] = (torch.kron(G, A), bias)
    return f, blocks


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", [c for c in CASES if "encoder" not in c])
def test_the_reference_reimplementation_is_the_model(case):
    model, x, _ = setup(case)
    with torch.no_grad():
        torch.testing.assert_close(reference(model, x)[0], model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("case", CASES)
def test_full_and_diag_equal_brute_force(case, task, structure):
    model, x, y = setup(case, task)
    la = fit(model, x, y, task, structure)
    H = oracle.ggn(model, x, y, nll(task))
    if structure == "full":
        rel_close(la.H.to_dense(), H)
    else:
        rel_close(la.H.diag(), H.diagonal())


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", [c for c in CASES if "encoder" not in c])
def test_kfac_of_the_attention_projections_is_the_definition(case, approx):
    model, x, y = setup(case)
    la = fit(model, x, y, "regression", "kron", kfac_approx=approx)
    _, blocks = kfac_by_hand(model, x, approx)
    H = la.H.to_dense()
    at = offsets(model)
    for part, weight, bias in (("in_proj", "enc.self_attn.in_proj_weight",
                                "enc.self_attn.in_proj_bias"),
                               ("out_proj", "enc.self_attn.out_proj.weight",
                                "enc.self_attn.out_proj.bias"),
                               ("linear1", "enc.linear1.weight", "enc.linear1.bias")):
        kron, G = blocks[part]
        (w0, w1), (b0, b1) = at[weight], at[bias]
        rel_close(H[w0:w1, w0:w1], kron)
        rel_close(H[b0:b1, b0:b1], G)
        assert not H[w0:w1, b0:b1].any()
    kinds = {n: _block_of(la, n) for n in at}
    assert kinds["enc.self_attn.in_proj_weight"] is Kronecker
    assert kinds["enc.self_attn.out_proj.weight"] is Kronecker
    exact = oracle.ggn(model, x, y, nll("regression")).diagonal()
    for name in ("enc.norm1.weight", "enc.norm1.bias", "enc.norm2.weight", "enc.norm2.bias"):
        assert kinds[name] is Diagonal  # LayerNorm: exact diagonal blocks
        s, t = at[name]
        rel_close(H[s:t, s:t], torch.diag(exact[s:t]))
    # the FFN Linears keep Kronecker blocks also sequence first (batch in dim 1)
    assert kinds["enc.linear1.weight"] is Kronecker and kinds["enc.linear2.weight"] is Kronecker


def _block_of(la, name):
    """The type of the block that covers parameter ``name``."""
    start = offsets(la.model)[name][0]
    for block, lo, hi in zip(la.H.blocks, la.H.offsets[:-1], la.H.offsets[1:]):
        if lo <= start < hi:
            return type(block)
    raise KeyError(name)


def _block_owners(la):
    """The first parameter tensor of each block, in block order."""
    at = offsets(la.model)
    starts = {s: n for n, (s, _) in at.items()}
    return [starts[int(o)] for o in la.H.offsets[:-1]]


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("case", CASES)
def test_glm_variance_and_evidence_equal_brute_force(case, task, structure):
    model, x, y = setup(case, task)
    la = fit(model, x, y, task, structure)
    xt = torch.randn(5, L, D_IN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f_lw, v_lw = glm_moments(la, xt, backend="layerwise", chunk_size=3)
        _, joint = glm_moments(la, xt[:3], joint=True, backend="layerwise")
    assert not [w for w in caught if "cannot be recorded" in str(w.message)]  # all recorded
    f_gen, v_gen = glm_moments(la, xt, backend="generic")
    J = oracle.jacobians(model, xt)
    Sigma = torch.linalg.inv(la.posterior_precision)
    rel_close(v_lw, J @ Sigma @ J.mT)
    rel_close(v_gen, J @ Sigma @ J.mT)
    Jj = J[:3].reshape(-1, J.shape[-1])
    rel_close(joint, Jj @ Sigma @ Jj.T)
    with torch.no_grad():
        rel_close(f_lw, model(xt), 1e-12)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with torch.no_grad():
        log_lik = -nll(task)(model(x), y)
    if task == "regression":
        log_lik = log_lik - y.numel() * math.log(0.7 * math.sqrt(2 * math.pi))
    H = oracle.ggn(model, x, y, nll(task))
    H = {"full": H, "diag": torch.diag(H.diagonal()), "kron": la.H.to_dense()}[structure]
    rel_close(la.log_marginal_likelihood(),
              oracle.laplace_evidence(log_lik, theta, H, torch.ones_like(theta)))


@pytest.mark.parametrize("case", CASES)
def test_explicit_attention_equals_the_fast_paths_and_the_model_is_untouched(case):
    model, x, _ = setup(case)
    model.eval()
    with torch.no_grad():
        fast = model(x)  # fused kernels (eval, no grad) where torch takes them
    mha = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    lmap = layer_map(model, select_subset(model, "all"))
    names = [rec.name for rec in lmap.layers]
    assert "enc.self_attn.in_proj" in names or "enc.layers.0.self_attn.in_proj" in names
    assert not any(n.endswith("out_proj") and n + ".weight" not in lmap.owner for n in names)
    enabled = torch.backends.mha.get_fastpath_enabled()
    with LayerRecorder(lmap.layers):
        assert all("forward" in m.__dict__ for m in mha)
        with torch.no_grad():
            explicit = model(x)
    rel_close(explicit, fast, 1e-12)
    assert all("forward" not in m.__dict__ for m in mha)
    assert torch.backends.mha.get_fastpath_enabled() == enabled
    assert not any(m._forward_hooks for m in model.modules())
    for m in mha:  # the module's own fast path against the explicit forward, directly
        q = torch.randn(3, L, E) if m.batch_first else torch.randn(L, 3, E)
        with torch.no_grad():
            ref = m(q, q, q, need_weights=False)[0]
            out = mha_forward(m, lambda part, t, w, b=None, rows=None: t @ w.T + b, q, q, q,
                              need_weights=False)[0]
        rel_close(out, ref, 1e-12)


class CrossAttention(nn.Module):
    """query ≠ key = value: in_proj as three maps (zero-padded output gradients)."""

    def __init__(self, kdim=None):
        super().__init__()
        self.a, self.b = nn.Linear(D_IN, E), nn.Linear(D_IN, kdim or E)
        self.att = nn.MultiheadAttention(E, HEADS, kdim=kdim, vdim=kdim, batch_first=True)
        self.head = nn.Linear(E, C)

    def forward(self, x):
        q, kv = self.a(x), torch.tanh(self.b(x[:, :3]))
        return self.head(self.att(q, kv, kv)[0].mean(1))


@pytest.mark.parametrize("kdim", [None, 5])
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_cross_attention_and_separate_projection_weights(structure, kdim):
    model = CrossAttention(kdim)
    x, task = torch.randn(6, L, D_IN), "classification"
    y = torch.randint(0, C, (6,))
    la = fit(model, x, y, task, structure)
    H = oracle.ggn(model, x, y, nll(task))
    if structure == "full":
        rel_close(la.H.to_dense(), H)
    if structure == "diag":
        rel_close(la.H.diag(), H.diagonal())
    if structure == "kron":
        owners = dict(zip(_block_owners(la), la.H.blocks))
        first = "att.in_proj_weight" if kdim is None else "att.q_proj_weight"
        assert isinstance(owners[first], Kronecker)
    xt = torch.randn(4, L, D_IN)
    _, v_lw = glm_moments(la, xt, backend="layerwise")
    J = oracle.jacobians(model, xt)
    rel_close(v_lw, J @ torch.linalg.inv(la.posterior_precision) @ J.mT)


@pytest.mark.parametrize("case", ["bf-pooled", "sf-tokens-causal", "bf-encoder-padding"])
def test_lowrank_equals_the_top_eigenpairs(case):
    """The Lanczos matvec (torch.func.jvp) runs with torch's fused attention kernels off (they
    have no forward mode); the model's fast-path setting is restored."""
    model, x, y = setup(case, "regression")
    before = torch.backends.mha.get_fastpath_enabled()
    la = fit(model, x, y, "regression", "lowrank", rank=5)
    assert torch.backends.mha.get_fastpath_enabled() == before
    H = oracle.ggn(model, x, y, nll("regression"))
    rel_close(la.H.blocks[0].s, torch.linalg.eigvalsh(H).flip(0)[:5], 1e-6)
