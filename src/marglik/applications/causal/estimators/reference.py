"""The authors' neural LOCI estimator (aleximmer/loci, ``causa/loci.py``), many networks at once.

:class:`ReferenceNeuralEstimator` is the network of ``build_het_network``: an MLP 1→H tanh→2 with
outputs f = (f1, f2) followed by the head of ``HetSpindlyHead``, out1 = a·f1, out2 = exp(b·f2) (a, b
scalars, b initialised to 0), read as natural parameters (``causa/ml.py``,
``heteroscedastic_normal`` with ``param_2='multiplicative'``, ν = −½):

    η1 = a f1,   η2 = −½ exp(b f2),   μ = −η1 / (2η2),   σ² = −1 / (2η2).

Training (``het_fit_nn``, ``map_optimization``): the mean negative log-likelihood, no prior,
full-batch Adam at lr 1e-2 with cosine annealing to 1e-6 over 5,000 steps, float64, every network
initialised by ``torch.manual_seed(711)``; the LOCI_M log-likelihood is −min over the steps of the
loss before each step. See docs/causal.md §1 for every setting and its source.

:func:`fit_reference_batch` trains B such networks — both directions of many pairs, of different
sizes — as one batch: parameters W1 (B, H, 1), b1 (B, H, 1), W2 (B, 2, H), b2 (B, 2, 1),
head (B, 2, 1) = (a, b); data X (B, 1, n), Y (B, n) padded to the largest n with point weights
M (B, n) = 1/n_b on real points and 0 on padding. The loss is Σ_b mean_i nll_bi and Adam is
elementwise, so each network follows exactly the path of its own one-network fit (tested). Networks
run in chunks of ``chunk`` so that a chunk's tensors stay in cache for all steps. What makes a step
cheap (no hidden layer formed, a flat Adam, optional float32 work): docs/causal.md §3.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from marglik.applications.causal.estimators.base import LOG_2PI, ConditionalGaussian

__all__ = ["ReferenceNeuralEstimator", "fit_reference_batch", "reference_nll_grads"]

#: the authors' settings (``causa/loci.py``: ``het_fit_nn``; ``causa/ml.py``: ``map_optimization``)
REFERENCE_NN = {"hidden": 100, "steps": 5000, "lr": 1e-2, "lr_min": 1e-6, "seed": 711}


class ReferenceNeuralEstimator(ConditionalGaussian):
    """p(y | x) by the authors' network and training (see the module docstring), float64.

    After ``fit``: ``params_`` (W1 (H, 1), b1 (H, 1), W2 (2, H), b2 (2, 1), head (2, 1)) and
    ``min_loss_``, the smallest mean NLL seen during training (LOCI_M uses −min_loss_).

    Args:
        hidden, steps, lr, lr_min, seed: width, Adam steps, initial and final cosine learning
            rate, initialisation seed (defaults: the authors').
        chunk: networks per chunk in :func:`fit_reference_batch` (a speed setting only).
        compute_dtype: dtype of the (networks × hidden × points) work of every step (the hidden
            layer and its products, :func:`reference_nll_grads`); the loss, its gradients, the
            parameters and Adam stay float64. float64 (default) is the authors' setting; float32
            is faster and changes the fits by rounding (docs/causal.md §3 states the measured
            effect on the decisions).
    """

    def __init__(
        self,
        hidden: int = 100,
        steps: int = 5000,
        lr: float = 1e-2,
        lr_min: float = 1e-6,
        seed: int = 711,
        chunk: int = 4,
        compute_dtype: torch.dtype = torch.float64,
    ):
        if steps < 1 or hidden < 1 or chunk < 1:
            raise ValueError(f"steps, hidden and chunk must be ≥ 1, got {steps}, {hidden}, {chunk}")
        if not 0 <= lr_min <= lr:
            raise ValueError(f"need 0 ≤ lr_min ≤ lr, got lr={lr}, lr_min={lr_min}")
        self.hidden, self.steps, self.lr, self.lr_min, self.seed = hidden, steps, lr, lr_min, seed
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float32 or float64, got {compute_dtype}")
        self.chunk, self.compute_dtype = chunk, compute_dtype

    def fit(self, x: np.ndarray, y: np.ndarray) -> ReferenceNeuralEstimator:
        """Fit to cause ``x`` (n,) and effect ``y`` (n,)."""
        fit_reference_batch([self], [(x, y)])
        return self

    def _key(self) -> tuple:
        return (self.hidden, self.steps, self.lr, self.lr_min, self.seed, self.compute_dtype)

    def outputs(self, x: np.ndarray) -> torch.Tensor:
        """(out1, out2) of the network at ``x`` (n,), as (n, 2) float64."""
        W1, b1, W2, b2, head = self.params_
        X = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(1, -1)
        f = W2 @ torch.tanh(W1 @ X + b1) + b2  # (2, n)
        return torch.stack([head[0, 0] * f[0], torch.exp(head[1, 0] * f[1])], dim=1)

    def natural_parameters(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.outputs(x)
        return out[:, 0].numpy(), (-0.5 * out[:, 1]).numpy()


def reference_init(hidden: int, seed: int) -> list[torch.Tensor]:
    """The authors' initial weights: ``torch.manual_seed(seed)``, then ``build_het_network`` in
    float64 (nn.Linear defaults; the head's b set to 0). The global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        first = torch.nn.Linear(1, hidden, dtype=torch.float64)
        second = torch.nn.Linear(hidden, 2, dtype=torch.float64)
        lin1 = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
        torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)  # lin2: drawn, then zeroed
    head = torch.stack([lin1.weight.detach()[0], torch.zeros(1, dtype=torch.float64)])
    return [
        first.weight.detach().clone(),  # (H, 1)
        first.bias.detach().reshape(-1, 1).clone(),  # (H, 1)
        second.weight.detach().clone(),  # (2, H)
        second.bias.detach().reshape(-1, 1).clone(),  # (2, 1)
        head,  # (2, 1): a, b
    ]


def reference_nll_grads(
    params: list[torch.Tensor],
    X: torch.Tensor,
    Y: torch.Tensor,
    M: torch.Tensor,
    work: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Weighted NLL per network Σ_i M_bi nll_bi, (B,), and the gradients of its sum.

    Shapes as in the module docstring; ``work``: two (B, H, n) buffers to reuse (fresh large
    temporaries cost page faults at every step). The (B, H, n) work runs in the dtype of X (and
    ``work``): float64, or float32 for speed (``compute_dtype``); the rest in the parameters' dtype.

    With u = b f2 (precision e^u, σ² = e^{−u}), μ = a f1 σ²:
    nll = ½ e^u (y − μ)² − ½ u + ½ log 2π; ∂nll/∂η = (μ − y, μ² + σ² − y²) and ∂η2/∂u = η2, so
    ∂/∂f1 = a (μ − y), ∂/∂u = −½ e^u (μ² + σ² − y²), ∂/∂f2 = b ∂/∂u, ∂a = Σ f1 (μ − y),
    ∂b = Σ f2 ∂/∂u; then back through f = W2 h + b2, h = tanh(W1 x + b1).

    The hidden layer is never formed: with g = sigmoid(2(W1 x + b1)), tanh = 2g − 1 and
    1 − tanh² = 4 g(1 − g), so f = 2W2 g + (b2 − W2 1), ∂W2 = 2 ∂f gᵀ − (Σ_i ∂f) 1ᵀ and, with
    S = g − g² and R = [∂f ⊙ x; ∂f] (B, 4, n), ∂W1_j = 4 Σ_k W2_kj (R Sᵀ)_kj, ∂b1_j =
    4 Σ_k W2_kj (R Sᵀ)_(k+2)j: three passes over (B, H, n) (sigmoid, S, and the products).
    """
    W1, b1, W2, b2, head = params
    a, b = head[:, 0], head[:, 1]  # (B, 1) each
    dtype = X.dtype
    if work is None:
        work = (X.new_empty(W1.shape[:2] + X.shape[-1:]), X.new_empty(W1.shape[:2] + X.shape[-1:]))
    g, S = work
    torch.baddbmm((2 * b1).to(dtype), (2 * W1).to(dtype), X, out=g).sigmoid_()  # (B, H, n)
    W2c = W2.to(dtype)
    f = torch.baddbmm((b2 - W2.sum(-1, keepdim=True)).to(dtype), 2 * W2c, g).to(Y.dtype)
    f1, f2 = f[:, 0], f[:, 1]  # (B, n)
    u = b * f2
    precision = torch.exp(u)
    var = torch.exp(-u)
    mu = a * f1 * var
    residual = Y - mu
    nll = ((0.5 * precision * residual * residual - 0.5 * u) * M).sum(-1)
    nll = nll + 0.5 * LOG_2PI * M.sum(-1)
    d_eta1 = (mu - Y) * M
    d_u = (mu * mu + var - Y * Y) * precision * M * -0.5
    df = torch.stack([a * d_eta1, b * d_u], dim=1)  # (B, 2, n)
    d_head = torch.stack([(f1 * d_eta1).sum(-1, keepdim=True), (f2 * d_u).sum(-1, keepdim=True)], 1)
    db2 = df.sum(-1, keepdim=True)  # (B, 2, 1)
    dfc = df.to(dtype)
    dW2 = 2 * torch.bmm(dfc, g.transpose(1, 2)).to(W2.dtype) - db2  # (B, 2, H)
    torch.addcmul(g, g, g, value=-1, out=S)  # g − g² = ¼ (1 − tanh²)
    R = torch.cat([dfc * X, dfc], dim=1)  # (B, 4, n)
    G = torch.bmm(R, S.transpose(1, 2)).to(W2.dtype)  # (B, 4, H)
    dW1 = 4 * (W2 * G[:, :2]).sum(1).unsqueeze(-1)  # (B, H, 1)
    db1 = 4 * (W2 * G[:, 2:]).sum(1).unsqueeze(-1)
    return nll, [dW1, db1, dW2, db2, d_head]


def fit_reference_batch(
    estimators: list[ReferenceNeuralEstimator], data: list[tuple[np.ndarray, np.ndarray]]
) -> list[ReferenceNeuralEstimator]:
    """Fit ``estimators[i]`` to ``data[i] = (x, y)`` (each (n_i,)); estimators with equal settings
    train together, in chunks of similar n (padded, see the module docstring)."""
    groups: dict = {}
    for i, est in enumerate(estimators):
        groups.setdefault(est._key(), []).append(i)
    for members in groups.values():
        first = estimators[members[0]]
        init = reference_init(first.hidden, first.seed)
        members = sorted(members, key=lambda i: len(data[i][0]))
        for start in range(0, len(members), first.chunk):
            chunk = members[start : start + first.chunk]
            params, min_loss = _train_chunk(init, [data[i] for i in chunk], first)
            for j, i in enumerate(chunk):
                estimators[i].params_ = [p[j].clone() for p in params]
                estimators[i].min_loss_ = float(min_loss[j])
    return estimators


def _train_chunk(init, data, settings: ReferenceNeuralEstimator):
    """Adam with the cosine schedule on len(data) networks from ``init``; (params, min loss).

    All parameters live in one flat float64 vector of which ``params`` are views, so that
    ``torch.optim.Adam`` steps one tensor (its per-tensor overhead once, not five times).
    """
    B, n = len(data), max(len(x) for x, _ in data)
    dtype = settings.compute_dtype
    X = torch.zeros(B, 1, n, dtype=torch.float64)
    Y = torch.zeros(B, n, dtype=torch.float64)
    M = torch.zeros(B, n, dtype=torch.float64)
    for b, (x, y) in enumerate(data):
        X[b, 0, : len(x)] = torch.as_tensor(np.asarray(x, dtype=np.float64))
        Y[b, : len(y)] = torch.as_tensor(np.asarray(y, dtype=np.float64))
        M[b, : len(x)] = 1.0 / len(x)
    X = X.to(dtype)
    flat = torch.cat([p.unsqueeze(0).expand(B, *p.shape).reshape(-1) for p in init])
    params = _views(flat, [(B, *p.shape) for p in init])
    flat.grad = torch.empty_like(flat)
    grads = _views(flat.grad, [p.shape for p in params])
    optimiser = torch.optim.Adam([flat], lr=settings.lr)
    min_loss = torch.full((B,), math.inf, dtype=torch.float64)
    work = (X.new_empty(B, settings.hidden, n), X.new_empty(B, settings.hidden, n))
    with torch.no_grad():
        for step in range(settings.steps):
            loss, new = reference_nll_grads(params, X, Y, M, work)
            torch.minimum(min_loss, torch.nan_to_num(loss, nan=math.inf), out=min_loss)
            for g, value in zip(grads, new, strict=True):
                g.copy_(value)
            for group in optimiser.param_groups:
                group["lr"] = cosine_lr(step, settings.steps, settings.lr, settings.lr_min)
            optimiser.step()
    return params, min_loss


def _views(flat: torch.Tensor, shapes: list) -> list[torch.Tensor]:
    """Consecutive views of ``flat`` with the given shapes."""
    views, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[offset : offset + size].view(shape))
        offset += size
    return views


def cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    """Learning rate of step t (0-based) of T = ``total``: lr_min + (lr − lr_min)(1 + cos πt/T)/2.

    The closed form of ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total, eta_min=lr_min)``
    stepped once per optimiser step (what the authors use); equal to its recursion up to rounding.
    """
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * step / total)) / 2
