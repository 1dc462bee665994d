"""The learned affine augmentation and the averaged model (marglik.layers; LILA, NeurIPS 2022).

Generators and their exponentials against closed forms, resampling against explicit pixel
moves, η = 0 against the plain network, the sampling modes, bad input, the baselines and the
Augerino loss. The curvature and the evidence of the averaged model are in
test_augmentation_curvature.py.
"""

import math

import pytest
import torch
from torch import nn

from marglik.layers import (
    FULL_EXTENT,
    GENERATOR_NAMES,
    AffineAugmentation,
    AugmentedModel,
    affine_matrices,
    fixed_augmentation,
    fixed_nodes,
    lie_algebra,
    no_augmentation,
    warp,
)
from marglik.likelihoods import get_likelihood
from marglik.training.augerino import augerino_loss, augerino_regulariser, train_augerino
from marglik.training.map import map_loss


def one_generator(name: str, t: float, height: int = 5, width: int = 5) -> torch.Tensor:
    """T (2, 3) of a single generator at parameter t."""
    G = lie_algebra((name,), height, width, torch.float64)
    return affine_matrices(torch.tensor([1.0]), torch.tensor([t]), G)


def test_generators_exponentiate_to_the_closed_forms():
    a = 0.7
    c, s = math.cos(a), math.sin(a)
    expected = {
        "rotate": [[c, -s, 0], [s, c, 0]],
        "translate_x": [[1, 0, a], [0, 1, 0]],
        "translate_y": [[1, 0, 0], [0, 1, a]],
        "scale_x": [[math.exp(a), 0, 0], [0, 1, 0]],
        "scale_y": [[1, 0, 0], [0, math.exp(a), 0]],
        "shear": [[math.cosh(a), math.sinh(a), 0], [math.sinh(a), math.cosh(a), 0]],
    }
    for name, T in expected.items():
        torch.testing.assert_close(one_generator(name, a), torch.tensor(T), rtol=0, atol=1e-14)


def test_rotation_of_a_non_square_image_is_a_rotation_of_its_pixels():
    """In normalised coordinates a pixel rotation of an H×W image is D⁻¹ R D, D = diag(W, H)."""
    a, H, W = 0.3, 4, 8
    R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    D = torch.diag(torch.tensor([float(W), float(H)]))
    expected = torch.linalg.inv(D) @ R @ D
    torch.testing.assert_close(one_generator("rotate", a, H, W)[:, :2], expected, rtol=0,
                               atol=1e-14)


def test_combined_generators_match_the_power_series():
    G = lie_algebra(GENERATOR_NAMES, 6, 6, torch.float64)
    eps = torch.rand(3, 4, 6) * 2 - 1
    eta = torch.tensor([0.3, 0.2, 1.0, 0.4, 0.1, 0.25])
    A = torch.einsum("nsk,k,kij->nsij", eps, eta, G)
    series, term = torch.eye(3).expand_as(A).clone(), torch.eye(3).expand_as(A).clone()
    for k in range(1, 40):
        term = term @ A / k
        series = series + term
    torch.testing.assert_close(affine_matrices(eps, eta, G), series[..., :2, :], rtol=0,
                               atol=1e-13)


def test_translation_by_one_pixel_shifts_the_image():
    x = torch.arange(2 * 3 * 5, dtype=torch.float64).reshape(1, 2, 3, 5)
    theta = one_generator("translate_x", 2 / 5, 3, 5)[None]  # one pixel of 5: 2/W
    out = warp(x, theta)
    torch.testing.assert_close(out[..., :-1], x[..., 1:], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[..., -1], torch.zeros_like(x[..., -1]), rtol=0, atol=1e-12)
    theta = one_generator("translate_y", -2 / 3, 3, 5)[None]  # one row down
    out = warp(x, theta)
    torch.testing.assert_close(out[..., 1:, :], x[..., :-1, :], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[..., 0, :], torch.zeros_like(x[..., 0, :]), rtol=0,
                               atol=1e-12)


def test_quarter_rotation_moves_pixel_i_j_to_j_n_minus_1_minus_i():
    n = 5
    x = torch.randn(2, 3, n, n)
    out = warp(x, one_generator("rotate", math.pi / 2, n, n)[None].expand(2, 2, 3))
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    torch.testing.assert_close(out, x[:, :, j, n - 1 - i], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["random", "fixed"])
@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (3, 2, 5, 7), (2, 3, 9, 2)])
def test_zero_extent_copies_are_exactly_the_input(mode, shape):
    x = torch.randn(*shape)
    out = AffineAugmentation(init=0.0, mode=mode)(x, 3)
    assert out.shape == (shape[0], 3, *shape[1:])
    assert torch.equal(out, x.unsqueeze(1).expand_as(out))


def test_zero_extent_model_is_the_plain_network():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 4))
    x = torch.randn(5, 2, 5, 5)
    for model in (no_augmentation(net), AugmentedModel(net, AffineAugmentation(), 1)):
        model.train()
        assert torch.equal(model(x), net(x))
    model = AugmentedModel(net, AffineAugmentation(), 4)  # the mean of 4 equal copies
    torch.testing.assert_close(model(x), net(x), rtol=1e-15, atol=1e-15)


def test_fixed_mode_is_reproducible_and_random_mode_is_not():
    x = torch.randn(3, 1, 6, 6)
    aug = AffineAugmentation(("rotate", "translate_x"), init=[1.0, 0.3])
    aug.eval()  # "auto": fixed nodes in eval mode
    first = aug(x, 4)
    assert torch.equal(first, aug(x, 4))
    assert torch.equal(first, AffineAugmentation(("rotate", "translate_x"), [1.0, 0.3],
                                                 mode="fixed")(x, 4))
    assert torch.equal(first[0], aug(x[:1], 4)[0])  # a copy depends only on its input
    assert not torch.equal(first, AffineAugmentation(("rotate", "translate_x"), [1.0, 0.3],
                                                     mode="fixed", seed=1)(x, 4))
    aug.train()  # "auto": random in training mode, reproducible by torch's seed
    torch.manual_seed(3)
    a = aug(x, 4)
    b = aug(x, 4)
    torch.manual_seed(3)
    assert torch.equal(a, aug(x, 4)) and not torch.equal(a, b)


def test_fixed_nodes_are_a_low_discrepancy_quadrature_of_the_uniform():
    eps = fixed_nodes(64, 2, 0, torch.float64)
    assert eps.shape == (64, 2) and eps.min() >= -1 and eps.max() < 1
    # every one of the 8×8 cells of [−1, 1)² holds exactly one node (R_2 points, 64 of them:
    # at most 2 per cell and every row of cells hit — a random draw leaves ~37% empty)
    cells = ((eps + 1) * 4).floor().long()
    counts = torch.zeros(8, 8).index_put_((cells[:, 0], cells[:, 1]), torch.ones(64),
                                          accumulate=True)
    assert counts.max() <= 2 and (counts.sum(1) > 0).all()
    torch.testing.assert_close(eps.mean(0), torch.zeros(2), rtol=0, atol=0.05)


def test_works_in_float32_and_batch_size_one():
    aug = AffineAugmentation(init=0.1).float()
    out = aug(torch.randn(1, 3, 8, 6, dtype=torch.float32), 2)
    assert out.dtype == torch.float32 and out.shape == (1, 2, 3, 8, 6)


def test_eta_gradient_flows_through_the_copies():
    aug = AffineAugmentation(("rotate",), init=0.5, mode="fixed")
    x = torch.randn(2, 1, 5, 5)
    aug(x, 3).square().sum().backward()
    assert aug.eta.grad is not None and aug.eta.grad.abs().item() > 0


def test_extent_reports_abs_eta_per_generator():
    aug = AffineAugmentation(("rotate", "shear"), init=[1.0, 0.5])
    with torch.no_grad():
        aug.eta[1] = -0.25
    assert aug.extent == {"rotate": 1.0, "shear": 0.25}


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="non-negative"):
        AffineAugmentation(init=-0.1)
    with pytest.raises(ValueError, match="non-negative"):
        AffineAugmentation(init=float("nan"))
    with pytest.raises(ValueError, match="unknown generators"):
        AffineAugmentation(("rotation",))
    with pytest.raises(ValueError, match="at most once"):
        AffineAugmentation(("rotate", "rotate"))
    with pytest.raises(TypeError, match="strings"):
        AffineAugmentation((1,))
    with pytest.raises(ValueError, match="one per generator"):
        AffineAugmentation(("rotate", "shear"), init=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="unknown mode"):
        AffineAugmentation(mode="sobol")
    aug = AffineAugmentation()
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        aug(torch.randn(2, 5, 5), 2)
    with pytest.raises(TypeError, match="floating"):
        aug(torch.ones(2, 1, 5, 5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="at least 1"):
        aug(torch.randn(2, 1, 5, 5), 0)
    with pytest.raises(TypeError, match="n_samples"):
        AugmentedModel(nn.Flatten(), aug, 2.0)
    with pytest.raises(TypeError, match="net"):
        AugmentedModel(lambda x: x, aug, 2)

    class Wrong(nn.Module):
        def forward(self, x, n_samples):
            return x  # no copy dimension

    with pytest.raises(ValueError, match=r"\(N, S, \.\.\.\)"):
        AugmentedModel(nn.Flatten(), Wrong(), 2)(torch.randn(3, 4, 2, 2))


def test_baselines_freeze_eta():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    fixed = fixed_augmentation(net, n_samples=4)
    assert fixed.augmentation.generators == ("rotate",)
    assert fixed.augmentation.extent == {"rotate": FULL_EXTENT["rotate"]} and fixed.n_samples == 4
    assert not fixed.augmentation.eta.requires_grad
    assert not no_augmentation(net).augmentation.eta.requires_grad
    scaled = fixed_augmentation(net, ("scale_x", "shear"), [0.1, 0.2])
    assert scaled.augmentation.extent == pytest.approx({"scale_x": 0.1, "shear": 0.2})


def test_augerino_loss_is_the_map_loss_minus_the_norm_of_eta():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    model = AugmentedModel(net, AffineAugmentation(("rotate", "scale_x"), [0.3, 0.4]), 2)
    model.eval()  # fixed copies: the two evaluations see the same model
    lik = get_likelihood("classification")
    x, y = torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))
    eta = model.augmentation.eta
    loss = augerino_loss(model, lik, x, y, model.hyperparameters(), 0.1, 2.0, 10)
    expected = map_loss(model, lik, x, y, 2.0, 10, [eta]) - 0.1 * 0.5  # ‖(0.3, 0.4)‖ = 0.5
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=1e-14)
    prior = sum(p.square().sum() for p in net.parameters()) / 10  # δ‖θ‖²/(2N), no η
    nll = nn.functional.cross_entropy(model(x), y)
    torch.testing.assert_close(loss, nll + prior - 0.05, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(augerino_regulariser([eta], 2.0), torch.tensor(-1.0))
    with pytest.raises(ValueError, match="non-negative"):
        augerino_regulariser([eta], -1.0)
    with pytest.raises(ValueError, match="hyperparameters"):
        augerino_loss(model, lik, x, y, [])


def test_train_augerino_widens_eta_with_a_strong_regulariser():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    model = AugmentedModel(net, AffineAugmentation(("rotate",), 0.1), 2)
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,))
    history = train_augerino(model, [(x, y)], "classification", model.hyperparameters(),
                             n_epochs=5, lr_aug=0.1, strength=10.0)
    assert len(history["loss"]) == 5 and not model.training
    assert history["hyperparameters"][-1][0][0] > 0.4  # five Adam steps of 0.1 outward


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_gpu():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 9, 3))
    model = AugmentedModel(net, AffineAugmentation(init=0.2), 3).cuda()
    x = torch.randn(4, 1, 5, 5)
    out = model.eval()(x.cuda())
    torch.testing.assert_close(out.cpu(), model.cpu()(x), rtol=1e-10, atol=1e-12)
