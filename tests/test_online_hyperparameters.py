"""Evidence gradients in hyperparameters inside the model, and learning them online.

A differentiable fit (``Laplace.fit(create_graph=True)``) gives log Z(h) with both the data fit
and the curvature H(h) differentiable in h at fixed θ. References: the closed-form evidence of
Bayesian linear regression (exact, and by the envelope theorem its total derivative in h equals
the partial one at θ*) and central finite differences of plain refits for a tanh MLP.
"""

import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from marglik import Laplace
from marglik.training import marglik_training
from tests.oracle import gaussian_log_density

STRUCTURES = ["full", "kron", "diag"]


class InputScale(nn.Module):
    """x ↦ exp(log_scale) ⊙ x; ``log_scale`` (D,) is a parameter or a tensor held outside."""

    def __init__(self, log_scale: Tensor | None = None, dim: int = 2):
        super().__init__()
        if log_scale is None:
            log_scale = nn.Parameter(torch.zeros(dim))
        self.log_scale = log_scale

    def forward(self, x: Tensor) -> Tensor:
        return x * self.log_scale.exp()


def weight_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if not n.endswith("log_scale")]


def laplace(model, likelihood, structure, prior_precision, **kw) -> Laplace:
    return Laplace(
        model,
        likelihood,
        "subnetwork",
        structure,
        subnetwork=weight_names(model),
        prior_precision=prior_precision,
        **kw,
    )


# ------------------------------------------------------------------ 1. linear-Gaussian closed form
def design(structure: str, n: int = 12, d: int = 3) -> Tensor:
    """Random inputs, or orthogonal columns for "diag" (then ZᵀZ, Z = X diag(s), is diagonal)."""
    x = torch.randn(n, d)
    if structure == "diag":
        x = torch.linalg.qr(x)[0] * torch.tensor([1.0, 2.0, 0.5])
    return x


@pytest.mark.parametrize("structure", STRUCTURES)
def test_linear_gaussian_evidence_and_its_scale_gradient_match_the_closed_form(structure):
    n, d, c, delta, sigma = 12, 3, 2, 0.7, 0.4
    x = design(structure, n, d)
    y = torch.randn(n, c)
    log_scale = torch.tensor([0.2, -0.3, 0.1], requires_grad=True)

    def closed_form(log_s: Tensor) -> Tensor:
        """Σ_c log N(y_c | 0, Z Zᵀ/δ + σ² I) with Z = X diag(s) (independent outputs)."""
        z = x * log_s.exp()
        cov = z @ z.T / delta + sigma**2 * torch.eye(n)
        return sum(gaussian_log_density(y[:, k], torch.zeros(n), cov) for k in range(c))

    # θ* = exact posterior mean W* = (ZᵀZ/σ² + δI)⁻¹ Zᵀ Y / σ², as (C, D) rows
    z = (x * log_scale.exp()).detach()
    w_star = torch.linalg.solve(z.T @ z / sigma**2 + delta * torch.eye(d), z.T @ y / sigma**2).T
    model = nn.Sequential(InputScale(log_scale), nn.Linear(d, c, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(w_star)
    la = laplace(model, "regression", structure, delta, sigma_noise=sigma)
    log_z = la.fit([(x, y)], create_graph=True).log_marginal_likelihood()
    (grad,) = torch.autograd.grad(log_z, log_scale)

    expected = closed_form(log_scale)
    (expected_grad,) = torch.autograd.grad(expected, log_scale)
    torch.testing.assert_close(log_z, expected.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------- 2. tanh MLP: gradient = finite differences
def mlp(out: int, norm: bool = False) -> nn.Sequential:
    """InputScale → Linear → (LayerNorm: not a KFAC layer, its gradients come from autograd
    per sample; torch.func would differentiate it wrongly for the outer graph) → tanh → Linear."""
    layers = [InputScale(), nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, out)]
    if norm:
        layers.insert(2, nn.LayerNorm(4))
        with torch.no_grad():
            layers[2].weight.uniform_(0.5, 1.5)
            layers[2].bias.uniform_(-0.5, 0.5)
    return nn.Sequential(*layers)


@pytest.mark.filterwarnings("ignore:KFAC cannot express")
@pytest.mark.parametrize("likelihood", ["regression", "classification"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_mlp_evidence_gradient_matches_finite_differences_of_refits(structure, likelihood):
    classes = 3 if likelihood == "classification" else 1
    model = mlp(classes, norm=True)
    with torch.no_grad():
        model[0].log_scale.copy_(torch.tensor([0.3, -0.2]))
    x = torch.randn(10, 2)
    y = torch.randint(0, 3, (10,)) if classes == 3 else torch.randn(10, 1)
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    kw = {"sigma_noise": 0.5} if likelihood == "regression" else {}
    layerwise = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # Cholesky log-det for "full"
    h = model[0].log_scale

    def evidence(create_graph: bool) -> Tensor:
        la = laplace(model, likelihood, structure, layerwise, **kw)
        return la.fit(loader, create_graph=create_graph).log_marginal_likelihood()

    log_z = evidence(True)
    (grad,) = torch.autograd.grad(log_z, h)
    torch.testing.assert_close(log_z.detach(), evidence(False), rtol=1e-12, atol=1e-12)
    eps, fd = 1e-5, torch.zeros(2)
    for i in range(2):
        with torch.no_grad():
            h[i] += eps
            plus = evidence(False)
            h[i] -= 2 * eps
            minus = evidence(False)
            h[i] += eps
        fd[i] = (plus - minus) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    # the model is left as it was: flags restored, no hooks
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_create_graph_needs_the_ggn_and_a_supported_structure():
    model, x, y = mlp(1), torch.randn(5, 2), torch.randn(5, 1)
    with pytest.raises(ValueError, match="create_graph=True supports"):
        laplace(model, "regression", "lowrank", 1.0).fit([(x, y)], create_graph=True)
    with pytest.raises(ValueError, match="create_graph=True supports"):
        Laplace(model, "regression", hessian_structure="full", curvature="ef").fit(
            [(x, y)], create_graph=True
        )


# ---------------------------------------------------------------- 3. online learning and resume
class ScaleSecond(nn.Module):
    """(x1, x2) ↦ (x1, exp(log_s)·x2): the prior variance of x2's weight relative to x1's."""

    def __init__(self, log_s: Tensor):
        super().__init__()
        self.log_s = log_s

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x[:, :1], x[:, 1:] * self.log_s.exp()], 1)


def ard_data(n: int = 40, noise: float = 0.1):
    """Orthogonal design, y = 0.3 x1 + 2 x2 + noise: x2's weight wants a wider prior."""
    x = torch.linalg.qr(torch.randn(n, 2))[0] * math.sqrt(n)
    y = x @ torch.tensor([[0.3], [2.0]]) + noise * torch.randn(n, 1)
    return x, y


def optimal_log_scale(x: Tensor, y: Tensor) -> float:
    """argmax of the exact evidence over (δ, s, σ) for f = w1 x1 + w2 s x2, w ~ N(0, I/δ).

    Orthogonal design (‖x_d‖² = N): the projections z_d = x_dᵀy/√N ~ N(0, N v_d + σ²) with prior
    variances v1 = 1/δ, v2 = s²/δ, and the N − 2 residual directions ~ N(0, σ²); so σ² = RSS/(N−2),
    v_d = (z_d² − σ²)/N and s*² = v2/v1.
    """
    n = len(x)
    rss = (y - x @ torch.linalg.lstsq(x, y).solution).square().sum()
    v = ((x.T @ y).squeeze(1).square() / n - rss / (n - 2)) / n
    return 0.5 * math.log(v[1] / v[0])


def test_reaches_the_closed_form_optimum_when_theta_is_kept_at_its_map():
    x, y = ard_data()
    log_s_star = optimal_log_scale(x, y)  # ≈ 1.85
    log_s = torch.zeros((), requires_grad=True)
    model = nn.Sequential(ScaleSecond(log_s), nn.Linear(2, 1, bias=False))

    def to_map(epoch, model, la, history):  # θ ← exact MAP for the current δ, σ, s
        delta, sigma = history["prior_precision"][-1], history["sigma_noise"][-1]
        with torch.no_grad():
            z = model[0](x)
            a = z.T @ z / sigma**2 + delta * torch.eye(2)
            model[1].weight.copy_(torch.linalg.solve(a, z.T @ y / sigma**2).T)

    la, model, history = marglik_training(
        model,
        [(x, y)],
        "regression",
        hessian_structure="full",
        prior_structure="scalar",
        n_epochs=100,
        lr=0.0,  # θ moves only by the callback
        n_hypersteps=1,
        n_epochs_burnin=1,
        hyperparameters=log_s,  # a single tensor, held outside the model
        callback=to_map,
    )
    path = [h[0] for h in history["hyperparameters"]]
    assert len(path) == 100 and path[0] == 0.0 and path[1] > 0
    assert abs(log_s.item() - log_s_star) < 0.05
    # the returned posterior is refitted at the best state, hyperparameter included
    evaluated = [e for e in history["log_marglik"] if not math.isnan(e)]
    torch.testing.assert_close(
        la.log_marginal_likelihood().item(), max(evaluated), rtol=1e-8, atol=1e-8
    )
    assert la.subset.names == ["1.weight"] and la.n_params == 2


def test_a_hyperparameter_inside_the_model_moves_towards_the_optimum_not_by_theta_steps():
    x, y = ard_data(noise=0.5)
    log_s = nn.Parameter(torch.zeros(()))
    model = nn.Sequential(ScaleSecond(log_s), nn.Linear(2, 1, bias=False))
    la, _, history = marglik_training(
        model,
        [(x, y)],
        "regression",
        hessian_structure="full",
        prior_structure="scalar",
        n_epochs=60,
        lr=0.02,
        n_hypersteps=1,
        n_epochs_burnin=10,
        marglik_frequency=5,
        hyperparameters=[log_s],
    )
    path = [h[0] for h in history["hyperparameters"]]
    assert path[:10] == [0.0] * 10  # burn-in: θ's optimizer and prior leave it alone
    assert 0.5 < log_s.item() < optimal_log_scale(x, y)  # ≈ 1.7
    assert la.subset.names == ["1.weight"]


def regression_loader(seed: int = 0, n: int = 30):
    g = torch.Generator().manual_seed(seed)
    x = 4 * torch.rand(n, 2, generator=g) - 2
    y = torch.sin(2 * x[:, :1]) + 0.1 * x[:, 1:] + 0.2 * torch.randn(n, 1, generator=g)
    return DataLoader(
        TensorDataset(x, y), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


@pytest.mark.parametrize("where", ["outside", "model"])
def test_resume_with_a_hyperparameter_equals_an_uninterrupted_run(tmp_path, where):
    kwargs = dict(
        likelihood="regression",
        hessian_structure="kron",
        n_epochs=5,
        lr=1e-2,
        marglik_frequency=2,
        n_hypersteps=3,
    )

    def setup(init: float):
        torch.manual_seed(1)
        h = torch.full((2,), init, requires_grad=True)
        scale = InputScale(h if where == "outside" else None)
        if where == "model":
            with torch.no_grad():
                scale.log_scale.fill_(init)
        model = nn.Sequential(scale, nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        return model, scale.log_scale

    class Interrupt(Exception):
        pass

    def stop_at_2(epoch, model, la, history):
        if epoch == 2:
            raise Interrupt

    model_a, h_a = setup(0.1)
    torch.manual_seed(3)
    la_a, _, hist_a = marglik_training(
        model_a, regression_loader(), hyperparameters=[h_a], **kwargs
    )

    model_b, h_b = setup(0.1)
    path = tmp_path / "run.pt"
    torch.manual_seed(3)
    with pytest.raises(Interrupt):
        marglik_training(
            model_b,
            regression_loader(),
            hyperparameters=[h_b],
            checkpoint=path,
            callback=stop_at_2,
            **kwargs,
        )
    model_c, h_c = setup(-1.0)  # another value: everything comes from the checkpoint
    torch.manual_seed(123)
    la_c, _, hist_c = marglik_training(
        model_c, regression_loader(), hyperparameters=[h_c], checkpoint=path, **kwargs
    )
    for hist in (hist_a, hist_c):  # wall times differ between runs
        assert len(hist.pop("hyper_seconds")) == 5
    assert str(hist_c) == str(hist_a)  # bit-identical: float reprs round-trip, NaN included
    assert len(hist_a["hyperparameters"]) == 5
    assert hist_a["hyperparameters"][-1] != hist_a["hyperparameters"][0]
    assert torch.equal(h_a, h_c)
    for a, c in zip(model_a.state_dict().values(), model_c.state_dict().values()):
        assert torch.equal(a, c)
    assert torch.equal(la_a.prior_precision, la_c.prior_precision)
    assert torch.equal(la_a.log_marginal_likelihood(), la_c.log_marginal_likelihood())


def test_a_subsample_of_batches_stands_for_the_data_set():
    # the data set is one batch twice: its first batch, scaled by N/n = 2, is the whole evidence
    x, y = ard_data(20)
    loader = DataLoader(TensorDataset(torch.cat([x, x]), torch.cat([y, y])), batch_size=20)

    def run(hyper_batches):
        torch.manual_seed(0)
        log_s = torch.zeros((), requires_grad=True)
        model = nn.Sequential(ScaleSecond(log_s), nn.Linear(2, 1, bias=False))
        _, _, history = marglik_training(
            model,
            loader,
            "regression",
            hessian_structure="diag",
            n_epochs=3,
            lr=0.05,
            n_hypersteps=4,
            hyperparameters=[log_s],
            hyper_batches=hyper_batches,
        )
        return history

    full, sub = run(None), run(1)
    assert full["hyperparameters"][-1] != [0.0]
    for key in ("hyperparameters", "sigma_noise", "log_marglik"):
        torch.testing.assert_close(
            torch.tensor(sub[key]), torch.tensor(full[key]), rtol=1e-7, atol=1e-9
        )


# ------------------------------------------------------------------------------- 4. bad input
def test_bad_hyperparameters_raise():
    x, y = ard_data(10)
    loader = [(x, y)]

    def train(hyperparameters, model=None, **kw):
        model = model or nn.Sequential(InputScale(), nn.Linear(2, 1))
        kw = {"hessian_structure": "full", **kw}
        return marglik_training(
            model,
            loader,
            "regression",
            n_epochs=1,
            n_hypersteps=1,
            hyperparameters=hyperparameters,
            **kw,
        )

    h = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"hyperparameters\[0\] is a float, not a tensor"):
        train([1.0])
    with pytest.raises(ValueError, match="must be a tensor or an iterable"):
        train(3)
    with pytest.raises(ValueError, match="must be a floating tensor"):
        train([torch.zeros(2, dtype=torch.long)])
    with pytest.raises(ValueError, match="does not require grad"):
        train([torch.zeros(2)])
    with pytest.raises(ValueError, match="not a leaf tensor"):
        train([h * 2])
    with pytest.raises(ValueError, match=r"hyperparameters\[1\] is registered twice"):
        train([h, h])
    only = InputScale()
    with pytest.raises(ValueError, match="none is left for the posterior"):
        train(list(only.parameters()), model=only)
    with pytest.raises(ValueError, match="hessian_structure 'full', 'kron' or 'diag'"):
        train([h], hessian_structure="lowrank")
    with pytest.raises(ValueError, match="curvature='ggn'"):
        train([h], laplace_kwargs={"curvature": "ef"})
    with pytest.raises(ValueError, match="applies only with hyperparameters"):
        train(None, hyper_batches=1)
    with pytest.raises(ValueError, match="positive integer"):
        train([h], hyper_batches=0)
    # h never enters the forward pass: found at the first evidence update
    with pytest.raises(ValueError, match=r"hyperparameters\[0\] do not affect the evidence"):
        train([h])


def test_a_checkpoint_must_hold_the_same_hyperparameters(tmp_path):
    x, y = ard_data(10)
    path = tmp_path / "run.pt"
    model = nn.Sequential(InputScale(), nn.Linear(2, 1))
    kw = dict(hessian_structure="full", n_epochs=1, n_hypersteps=1, checkpoint=path)
    marglik_training(model, [(x, y)], "regression", **kw)  # log_scale is a weight here
    with pytest.raises(
        ValueError, match="checkpoint holds 0 hyperparameters, this run registers 1"
    ):
        marglik_training(model, [(x, y)], "regression", hyperparameters=[model[0].log_scale], **kw)
