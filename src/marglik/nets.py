"""Small network builders shared by the applications, the CLI, the examples and the benchmarks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["Standardize", "digit_cnn", "lenet", "mlp"]


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """A fully connected network ``sizes[0] → sizes[1] → … → sizes[-1]``.

    ``nn.Linear`` layers with ``activation()`` between them (none after the last), created in
    order, so a fixed seed gives the same weights as building the layers by hand.

    Args:
        sizes: layer widths, input first; at least two.
        activation: module class applied after every layer but the last.
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive widths, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(int(a), int(b)))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class Standardize(nn.Module):
    """Fixed input standardisation ``(x − mean) / std`` with Python-float constants.

    It holds no parameters and no buffers, so a network that starts with it loads a state dict
    saved without it, and no posterior sees it.
    """

    def __init__(self, mean: float, std: float):
        super().__init__()
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        self.mean, self.std = float(mean), float(std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


def lenet(n_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """LeNet-5 for 28×28 images (LeCun et al., 1998, with ReLU and max-pooling).

    Conv(c→6, 5)-ReLU-MaxPool(2)-Conv(6→16, 5)-ReLU-MaxPool(2)-Flatten-Linear(256→120)-ReLU-
    Linear(120→84)-ReLU-Linear(84→n_classes): 44,426 parameters for one channel and ten classes,
    the network of the MNIST experiments of Laplace Redux (Daxberger et al., NeurIPS 2021).
    Input (N, c, 28, 28), output (N, n_classes) logits.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, n_classes),
    )


def digit_cnn(input_size: int = 28, mean: float = 0.0, std: float = 1.0) -> nn.Sequential:
    """A two-block convolutional digit classifier whose state-dict keys are ``features.*`` and
    ``classifier.*``.

    Standardize(mean, std) → features: Conv(1→32, 3, p1)-ReLU-MaxPool(2)-Conv(32→64, 3, p1)-
    ReLU-MaxPool(2) → Flatten → classifier: Linear(64·(s/4)²→128)-ReLU-Linear(128→10), with
    s = ``input_size``; 421,642 parameters for s = 28. Written from the shapes of the pretrained
    MNIST weights shipped by the ``ccexam`` package (``MNISTNet(28)``), so that they load with
    ``strict=True`` (see :func:`marglik.data.mnist.load_pretrained_mnist_cnn`). Input
    (N, 1, s, s), output (N, 10) logits.
    """
    if input_size < 4 or input_size % 4:
        raise ValueError(f"input_size must be a positive multiple of 4, got {input_size}")
    features = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    )
    side = input_size // 4
    classifier = nn.Sequential(nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(OrderedDict(
        standardize=Standardize(mean, std), features=features, flatten=nn.Flatten(),
        classifier=classifier,
    ))
