import gzip
import pickle
import struct
import sys

import numpy as np
import pytest
from PIL import Image

from sftrl.data.images import (
    CELEBA_CROP,
    DataError,
    load_celeba,
    load_cifar10,
    load_digits_images,
    load_image_dataset,
    load_image_folder,
    load_mnist,
)


def _in_unit_range(x):
    return x.dtype == np.float32 and float(x.min()) >= -1.0 and float(x.max()) <= 1.0


# ---------------------------------------------------------------------------------- digits


def test_digits_shape_range_and_scaling():
    from sklearn.datasets import load_digits

    x = load_digits_images()
    assert x.shape == (1797, 1, 8, 8)
    assert _in_unit_range(x)
    raw = load_digits().images
    np.testing.assert_allclose(x[:, 0], raw / 8.0 - 1.0, atol=1e-7)  # 0..16 -> [-1, 1]
    assert x.min() == -1.0 and x.max() == 1.0


def test_digits_resize_to_16():
    x8, x16 = load_digits_images(8), load_digits_images(16)
    assert x16.shape == (1797, 1, 16, 16)
    assert _in_unit_range(x16)
    # bilinear upsampling by 2 keeps the mean of each image up to border effects
    np.testing.assert_allclose(x16.mean(axis=(1, 2, 3)), x8.mean(axis=(1, 2, 3)), atol=0.05)
    assert not np.allclose(x16[:, :, ::2, ::2], x16[:, :, 1::2, 1::2])


# ----------------------------------------------------------------------------------- MNIST


def _write_idx(path, images, magic=2051, compress=False, truncate=0):
    n, rows, cols = images.shape
    raw = struct.pack(">IIII", magic, n, rows, cols) + images.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - truncate]
    if compress:
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def _fake_mnist(n=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_parse(tmp_path, compress):
    images = _fake_mnist()
    images[3, 5, 9] = 255
    images[4, 0, 0] = 0
    name = "train-images-idx3-ubyte" + (".gz" if compress else "")
    _write_idx(tmp_path / name, images, compress=compress)
    x = load_mnist(tmp_path)
    assert x.shape == (7, 1, 28, 28)
    assert _in_unit_range(x)
    assert x[3, 0, 5, 9] == 1.0 and x[4, 0, 0, 0] == -1.0
    np.testing.assert_allclose(x[:, 0], images / 127.5 - 1.0, atol=1e-6)


def test_mnist_torchvision_layout_and_test_split(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", _fake_mnist(3))
    assert load_mnist(tmp_path, split="test").shape == (3, 1, 28, 28)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_mnist_missing_dir(tmp_path):
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path / "nope")
    msg = str(err.value)
    assert "nope" in msg and "train-images-idx3-ubyte" in msg and "yann.lecun.com" in msg
    assert "\n" not in msg


def test_mnist_wrong_magic(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", _fake_mnist(), magic=2049)
    with pytest.raises(DataError, match="wrong IDX magic 2049"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("truncate", [1, 28 * 28 * 7 + 5])
def test_mnist_truncated(tmp_path, truncate):
    _write_idx(tmp_path / "train-images-idx3-ubyte", _fake_mnist(), truncate=truncate)
    with pytest.raises(DataError, match="truncated"):
        load_mnist(tmp_path)


# -------------------------------------------------------------------------------- CIFAR-10


def _write_cifar(folder, per_batch=4, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batches.append(data)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * per_batch}, f)
    return np.concatenate(batches)


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar10_batches(tmp_path, use_parent):
    folder = tmp_path / "cifar-10-batches-py"
    data = _write_cifar(folder)  # 5 batches x 4 = 20 images
    x = load_cifar10(tmp_path if use_parent else folder)
    assert x.shape == (20, 3, 32, 32)
    assert _in_unit_range(x)
    # CHW row-major: image 6 (batch 2, row 2), channel 1 (G), row 3, col 7
    flat = 1 * 1024 + 3 * 32 + 7
    assert x[6, 1, 3, 7] == pytest.approx(data[6, flat] / 127.5 - 1.0, abs=1e-6)
    assert load_cifar10(folder, limit=6).shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(load_cifar10(folder, limit=6), x[:6])


def test_cifar10_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "absent")
    with pytest.raises(DataError, match="batches not found"):
        load_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3.*cannot unpickle"):
        load_cifar10(folder)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), dtype=np.uint8)}, f)
    with pytest.raises(DataError, match="malformed batch"):
        load_cifar10(folder)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), dtype=np.uint8)}, f)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5: CIFAR-10 batch missing"):
        load_cifar10(folder)
    assert load_cifar10(folder, limit=16).shape == (16, 3, 32, 32)  # stops before batch 5


# ---------------------------------------------------------------------------------- CelebA


def _celeba_folder(tmp_path, n=5):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    top, left, height, width = CELEBA_CROP
    for i in range(n):
        arr = np.full((218, 178, 3), 40, dtype=np.uint8)
        arr[top : top + height, left : left + width] = 200  # the crop window
        # PNG bytes under a .jpg name keep the test lossless; PIL decodes by content
        Image.fromarray(arr).save(folder / f"{i + 1:06d}.jpg", format="PNG")
    return folder


def test_celeba_crop_window_exact(tmp_path):
    folder = _celeba_folder(tmp_path)
    # Resize to 128 = the crop size: the output is exactly the crop, no interpolation.
    x = load_celeba(folder, image_size=128)
    assert x.shape == (5, 3, 128, 128)
    expected = 200 / 127.5 - 1.0
    np.testing.assert_allclose(x, expected, atol=1e-6)  # nothing outside rows 57:185, cols 25:153


def test_celeba_crop_marker_pixels(tmp_path):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    arr = np.zeros((218, 178, 3), dtype=np.uint8)
    arr[57, 25] = (255, 0, 0)  # first pixel inside the crop -> (0, 0)
    arr[184, 152] = (0, 255, 0)  # last pixel inside the crop -> (127, 127)
    arr[56, 24] = arr[185, 153] = (0, 0, 255)  # just outside: must not appear
    Image.fromarray(arr).save(folder / "000001.jpg", format="PNG")
    x = load_celeba(tmp_path, image_size=128)  # the parent folder works too
    assert x[0, :, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert x[0, :, 127, 127].tolist() == [-1.0, 1.0, -1.0]
    assert float(x[0, 2].max()) == -1.0


def test_celeba_resize_64_and_limit(tmp_path):
    folder = _celeba_folder(tmp_path)
    x = load_celeba(folder, limit=3)
    assert x.shape == (3, 3, 64, 64)
    assert _in_unit_range(x)
    np.testing.assert_allclose(x, 200 / 127.5 - 1.0, atol=1e-6)


def test_celeba_errors(tmp_path):
    with pytest.raises(DataError, match="mmlab.ie.cuhk.edu.hk"):
        load_celeba(tmp_path / "missing")
    empty = tmp_path / "img_align_celeba"
    empty.mkdir()
    with pytest.raises(DataError, match="no CelebA JPEGs"):
        load_celeba(empty)
    Image.new("RGB", (100, 100)).save(empty / "000001.jpg", format="PNG")
    with pytest.raises(DataError, match="not an aligned CelebA image"):
        load_celeba(empty)
    (empty / "000001.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot decode"):
        load_celeba(empty)


def test_missing_pillow_is_a_data_error(tmp_path, monkeypatch):
    _celeba_folder(tmp_path, n=1)
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` fail
    with pytest.raises(DataError, match="needs Pillow"):
        load_celeba(tmp_path)


# ---------------------------------------------------------------------------------- folders


def test_image_folder_mixed_sizes(tmp_path):
    sizes = [(40, 30), (30, 40), (17, 17), (64, 20)]  # (width, height)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (255, 0, 128)).save(tmp_path / f"img{i}.png")
    (tmp_path / "sub").mkdir()
    Image.new("L", (10, 10), 0).save(tmp_path / "sub" / "gray.jpg", quality=100)
    (tmp_path / "notes.txt").write_text("not an image")  # ignored
    x = load_image_folder(tmp_path, image_size=12)
    assert x.shape == (5, 3, 12, 12)
    assert _in_unit_range(x)
    np.testing.assert_allclose(x[0, :, 6, 6], [1.0, -1.0, 128 / 127.5 - 1.0], atol=1e-6)
    assert float(np.abs(x[4] + 1.0).max()) < 0.02  # the black grayscale JPEG
    gray = load_image_folder(tmp_path, image_size=8, channels=1, limit=2)
    assert gray.shape == (2, 1, 8, 8)


def test_image_folder_center_crop(tmp_path):
    arr = np.zeros((10, 30, 3), dtype=np.uint8)  # wide: the centre 10x10 is cols 10:20
    arr[:, 10:20] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_image_folder(tmp_path, image_size=10)
    np.testing.assert_allclose(x, 1.0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        load_image_folder(tmp_path / "x", image_size=8)
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(DataError, match="no image files found"):
        load_image_folder(tmp_path, image_size=8)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="broken.png.*cannot decode"):
        load_image_folder(tmp_path, image_size=8)


# --------------------------------------------------------------------------------- dispatch


def test_dispatch(tmp_path):
    assert load_image_dataset("digits", None).shape == (1797, 1, 8, 8)
    assert load_image_dataset("digits", None, image_size=16, limit=10).shape == (10, 1, 16, 16)
    _write_idx(tmp_path / "train-images-idx3-ubyte", _fake_mnist(4))
    assert load_image_dataset("mnist", tmp_path).shape == (4, 1, 28, 28)
    x32 = load_image_dataset("mnist", tmp_path, image_size=32, limit=2)
    assert x32.shape == (2, 1, 32, 32) and _in_unit_range(x32)
    _write_cifar(tmp_path / "cifar-10-batches-py")
    assert load_image_dataset("cifar10", tmp_path, limit=5).shape == (5, 3, 32, 32)
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (9, 9)).save(folder / "a.png")
    assert load_image_dataset("folder", folder, image_size=4).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="data.image_size"):
        load_image_dataset("folder", folder)


def test_dispatch_errors():
    with pytest.raises(ValueError, match="digits, mnist, cifar10, celeba, folder"):
        load_image_dataset("imagenet", "/data")
    for name in ("mnist", "cifar10", "celeba", "folder"):
        with pytest.raises(DataError, match="set data.path"):
            load_image_dataset(name, None)
