"""Image datasets: the bundled 8x8 digits and user-supplied MNIST, CIFAR-10, CelebA and folders.

Every loader returns a ``float32`` numpy array ``(N, C, H, W)`` scaled to [-1, 1] (an 8-bit
pixel ``v`` becomes ``v / 127.5 - 1``), the range the DDPM samplers, the critic and the
baseline work in. Nothing is downloaded: a missing or malformed path raises :class:`DataError`
with a one-line message naming the path, what was expected there and where to get the files.

==========  =======================================  =======================================
name        files expected at ``data.path``          shape (native size)
==========  =======================================  =======================================
digits      none (ships with scikit-learn)           (1797, 1, 8, 8)
mnist       ``train-images-idx3-ubyte[.gz]``         (60000, 1, 28, 28)
cifar10     ``cifar-10-batches-py/data_batch_1..5``  (50000, 3, 32, 32)
celeba      ``img_align_celeba/*.jpg`` (178x218)     (202599, 3, 64, 64) after the paper's crop
folder      any ``*.png`` / ``*.jpg`` (recursive)    (N, C, image_size, image_size)
==========  =======================================  =======================================

JPEG/PNG decoding uses Pillow (a dependency of matplotlib); the digits, MNIST and CIFAR-10
loaders need no image library.
"""

from __future__ import annotations

import dataclasses
import gzip
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

__all__ = [
    "CELEBA_CROP",
    "IMAGE_DATASETS",
    "DataError",
    "load_celeba",
    "load_cifar10",
    "load_digits_images",
    "load_image_dataset",
    "load_image_folder",
    "load_mnist",
]

IMAGE_DATASETS = ("digits", "mnist", "cifar10", "celeba", "folder")

# (top, left, height, width) of the paper's CelebA crop: rows 57..185, cols 25..153 of the
# 218x178 aligned images, a 128x128 face square (DDIM's CelebA pipeline, used by SFT-PG).
CELEBA_CROP = (57, 25, 128, 128)
CELEBA_SIZE = (218, 178)  # (height, width) of every img_align_celeba JPEG

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

MNIST_SOURCE = "download it from http://yann.lecun.com/exdb/mnist/ (or any mirror of the IDX files)"
CIFAR10_SOURCE = "download and extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CELEBA_SOURCE = (
    "download and extract img_align_celeba.zip (Align&Cropped Images) from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
)
FOLDER_SOURCE = "point data.path at a folder of your own images"

IDX_UBYTE_3D_MAGIC = 2051
# The most pixels an image file may decode to (an 8192 x 8192 photo); far above any training
# image, far below what a crafted header can claim.
MAX_IMAGE_PIXELS = 8192 * 8192  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)


class DataError(ValueError):
    """A dataset path is missing or its files are not what the loader expects."""


def _data_error(path: Path | str, expected: str, source: str, problem: str) -> DataError:
    """One line: ``<path>: <problem>; expected <what>; <where to get it>``."""
    return DataError(f"{path}: {problem}; expected {expected}; {source}")


def _uint8_to_unit(x: np.ndarray) -> np.ndarray:
    """``uint8`` pixels -> ``float32`` in [-1, 1] (0 -> -1, 255 -> 1)."""
    return (x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


def _resize(x: np.ndarray, image_size: int) -> np.ndarray:
    """Bilinear resize of ``(N, C, H, W)`` to ``(N, C, image_size, image_size)``.

    Downsampling is antialiased; a convex interpolation keeps values inside [-1, 1].
    """
    if x.shape[-2:] == (image_size, image_size):
        return x
    t = torch.from_numpy(x)
    antialias = image_size < max(x.shape[-2:])
    out = F.interpolate(
        t, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=antialias
    )  # (N, C, s, s)
    return out.clamp_(-1.0, 1.0).numpy().astype(np.float32, copy=False)


def resize_uint8(x: np.ndarray, image_size: int) -> np.ndarray:
    """``uint8`` ``(N, C, H, W)`` resized as :func:`_resize` does, rounded back to ``uint8``."""
    return np.rint((_resize(_uint8_to_unit(x), image_size) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def _check_image_size(image_size: int | None) -> int | None:
    return None if image_size is None else _positive_size(image_size)


def _positive_size(image_size: int) -> int:
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


def _check_limit(limit: int | None) -> int | None:
    if limit is not None and (int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    return None if limit is None else int(limit)


# ---------------------------------------------------------------------------------- digits


def load_digits_images(image_size: int = 8) -> np.ndarray:
    """scikit-learn's bundled 8x8 handwritten digits, the CPU image benchmark.

    ``sklearn.datasets.load_digits()``: 1797 images with integer values 0..16, mapped to
    [-1, 1] by ``v / 8 - 1``. With ``image_size != 8`` the images are resized bilinearly
    (e.g. 16 for a U-Net that needs four downsampling levels).

    Returns:
        ``float32`` array ``(1797, 1, image_size, image_size)`` in [-1, 1].
    """
    from sklearn.datasets import load_digits

    image_size = _positive_size(image_size)
    images = load_digits().images.astype(np.float32)  # (1797, 8, 8), values 0..16
    x = (images / np.float32(8.0) - np.float32(1.0))[:, None]  # (1797, 1, 8, 8)
    return _resize(x.astype(np.float32), image_size)


# ----------------------------------------------------------------------------------- MNIST


def _read_idx_images(file: Path) -> np.ndarray:
    """Parse an IDX3 ubyte file (optionally gzipped) -> ``uint8`` ``(N, rows, cols)``.

    Header: big-endian int32 magic 2051, then the three dimensions as big-endian uint32.
    """
    expected = f"an MNIST IDX image file (magic {IDX_UBYTE_3D_MAGIC}, then N, rows, cols)"
    opener = gzip.open if file.name.endswith(".gz") else open
    try:
        with opener(file, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise _data_error(file, expected, MNIST_SOURCE, f"cannot read ({err})") from err
    if len(raw) < 16:
        raise _data_error(file, expected, MNIST_SOURCE, f"truncated header ({len(raw)} bytes)")
    magic, n, rows, cols = (int(v) for v in np.frombuffer(raw[:16], dtype=">u4"))
    if magic != IDX_UBYTE_3D_MAGIC:
        raise _data_error(file, expected, MNIST_SOURCE, f"wrong IDX magic {magic}")
    if min(n, rows, cols) < 1:
        raise _data_error(file, expected, MNIST_SOURCE, f"the header gives {n} images of {rows}x{cols} pixels")
    size = n * rows * cols
    if len(raw) - 16 != size:
        raise _data_error(
            file,
            expected,
            MNIST_SOURCE,
            f"truncated or oversized data ({len(raw) - 16} pixel bytes for {n}x{rows}x{cols})",
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def load_mnist(path: str | Path, split: Literal["train", "test"] = "train") -> np.ndarray:
    """:func:`load_mnist_uint8` as ``float32`` in [-1, 1]."""
    return _uint8_to_unit(load_mnist_uint8(path, split))


def load_mnist_uint8(path: str | Path, split: Literal["train", "test"] = "train") -> np.ndarray:
    """MNIST digits from the original IDX files.

    ``path`` is a directory holding ``train-images-idx3-ubyte`` (``t10k-images-idx3-ubyte``
    for ``split="test"``), gzipped or not; torchvision's ``MNIST/raw`` sub-folder layout and
    the ``train-images.idx3-ubyte`` spelling are accepted too.

    Returns:
        ``uint8`` array ``(60000, 1, 28, 28)`` (test: 10000).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stem = "train-images" if split == "train" else "t10k-images"
    root = Path(path).expanduser()
    expected = f"a directory with {stem}-idx3-ubyte (or .gz)"
    if not root.is_dir():
        raise _data_error(root, expected, MNIST_SOURCE, "MNIST directory not found")
    names = [f"{stem}-idx3-ubyte", f"{stem}-idx3-ubyte.gz", f"{stem}.idx3-ubyte"]
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for name in names:
            if (folder / name).is_file():
                return _read_idx_images(folder / name)[:, None]  # (N, 1, 28, 28) uint8
    raise _data_error(root, expected, MNIST_SOURCE, "MNIST image file not found")


# -------------------------------------------------------------------------------- CIFAR-10


def _cifar_dir(root: Path) -> Path:
    expected = "cifar-10-batches-py/ with data_batch_1..5 and test_batch (python pickles)"
    if not root.is_dir():
        raise _data_error(root, expected, CIFAR10_SOURCE, "CIFAR-10 directory not found")
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return folder
    raise _data_error(root, expected, CIFAR10_SOURCE, "CIFAR-10 batches not found")


# The only globals a CIFAR-10 python batch names: numpy's array reconstruction (numpy 1 and 2
# spell its module differently; pickle protocol 5 rebuilds from a buffer) and the codec Python 3
# pickles of bytes use.
CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that names a global a data file never needs: refused before anything runs."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: any other global (``os.system``, a class with
    a ``__reduce__``) is refused instead of imported, so a crafted file runs no code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise RefusedPickle(f"{module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(file: Path) -> np.ndarray:
    """One CIFAR-10 python batch -> ``uint8`` ``(n, 3, 32, 32)``, read with an unpickler that
    takes numpy arrays, bytes, lists and dicts only (``CIFAR_PICKLE_GLOBALS``)."""
    expected = "a CIFAR-10 python batch (a pickled dict with b'data': uint8 (n, 3072))"
    if not file.is_file():
        raise _data_error(file, expected, CIFAR10_SOURCE, "CIFAR-10 batch missing")
    try:
        with open(file, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except RefusedPickle as err:
        raise _data_error(file, expected, CIFAR10_SOURCE, f"refused: the pickle names '{err}', which a CIFAR-10 "
                          "batch never holds (nothing in the file was run)") from None
    except Exception as err:  # unpickling raises many types on a corrupt file
        raise _data_error(file, expected, CIFAR10_SOURCE, f"cannot unpickle ({err!r})") from err
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
    ):
        got = getattr(data, "shape", type(data).__name__)
        raise _data_error(file, expected, CIFAR10_SOURCE, f"malformed batch (data: {got})")
    return data.reshape(-1, 3, 32, 32)  # rows are channel-major: R plane, G plane, B plane


def load_cifar10(
    path: str | Path, split: Literal["train", "test"] = "train", limit: int | None = None
) -> np.ndarray:
    """:func:`load_cifar10_uint8` as ``float32`` in [-1, 1]."""
    return _uint8_to_unit(load_cifar10_uint8(path, split, limit))


def load_cifar10_uint8(
    path: str | Path, split: Literal["train", "test"] = "train", limit: int | None = None
) -> np.ndarray:
    """CIFAR-10 from its python batches (``cifar-10-batches-py``, or the folder holding it).

    Each batch is a pickled dict whose ``b'data'`` is ``uint8`` ``(10000, 3072)``, one image per
    row in channel-major (CHW) order. The pickle is read with an unpickler that only rebuilds
    numpy arrays and plain data: a crafted batch that names any other global is refused before
    it can run code.

    Returns:
        ``uint8`` array ``(50000, 3, 32, 32)`` (test: 10000; ``limit``: the first ``limit``).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    limit = _check_limit(limit)
    folder = _cifar_dir(Path(path).expanduser())
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts, count = [], 0
    for name in names:
        parts.append(_read_cifar_batch(folder / name))
        count += len(parts[-1])
        if limit is not None and count >= limit:
            break
    return np.concatenate(parts)[:limit]


# ---------------------------------------------------------------------- CelebA and folders


def _pil(path: Path):
    try:
        from PIL import Image
    except ImportError as err:
        raise DataError(
            f"{path}: decoding JPEG/PNG images needs Pillow, which is not installed; "
            "pip install pillow"
        ) from err
    return Image


def _pil_to_array(img, channels: int) -> np.ndarray:
    """PIL image -> ``uint8`` ``(C, H, W)``."""
    arr = np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Image files to decode one by one into ``uint8`` ``(C, H, W)`` images of ``shape``;
    ``recipe`` says what ``decode`` does (the cache key holds it), ``note`` what the user should
    know of the choice of files."""

    name: str
    files: list[Path]
    decode: Callable[[Path], np.ndarray]
    shape: tuple[int, int, int]
    recipe: str
    note: str = ""

    def decode_all(self, out: np.ndarray | None = None, on_image: Callable[[int], object] | None = None) -> np.ndarray:
        """Every image into ``out`` (a new array, or a memory map to fill) ``(N, *shape)`` uint8."""
        if out is None:
            out = np.empty((len(self.files), *self.shape), dtype=np.uint8)
        for i, file in enumerate(self.files):
            out[i] = self.decode(file)
            if on_image is not None:
                on_image(1)
        return out


# CelebA's official split: list_eval_partition.txt marks the first 162,770 images (by name) train.
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
CELEBA_TRAIN_IMAGES = 162_770


def _celeba_train_files(root: Path, folder: Path, files: list[Path]) -> tuple[list[Path], str]:
    """The train split's files: by ``list_eval_partition.txt`` where it lies beside the images,
    else the first 162,770 by name (which the official split's are), said in the note."""
    for place in (root, folder, folder.parent):
        listing = place / CELEBA_PARTITION_FILE
        if listing.is_file():
            train = {line.split()[0] for line in listing.read_text().splitlines()
                     if len(line.split()) == 2 and line.split()[1] == "0"}
            return [f for f in files if f.name in train], f"CelebA train split from {listing}"
    kept = files[:CELEBA_TRAIN_IMAGES]
    return kept, (f"CelebA train split: no {CELEBA_PARTITION_FILE} beside the images, so the first {len(kept):,} "
                  "files by name (the official train split is images 000001-162770)")


def celeba_plan(path: str | Path, image_size: int = 64, limit: int | None = None,
                split: Literal["train", "all"] = "all") -> DecodePlan:
    """CelebA faces from ``img_align_celeba`` with the paper's crop and resize.

    ``path`` is the ``img_align_celeba`` directory of 178x218 JPEGs (or the folder holding it).
    Each image is cropped to rows 57..185 and columns 25..153 (``[57:185, 25:153]``, a 128x128
    face square, as DDIM's CelebA pipeline that SFT-PG uses) and resized to ``image_size`` with
    PIL's antialiased bilinear filter (torchvision's ``Resize`` on a PIL image). The random
    horizontal flip of that pipeline is a training augmentation, applied per batch
    (``sftrl.data.store.ImageStore``). ``split="train"``: the official 162,770 training images
    (``_celeba_train_files``); ``limit`` keeps the first ``limit`` of those in sorted order.
    """
    image_size = _positive_size(image_size)
    limit = _check_limit(limit)
    root = Path(path).expanduser()
    expected = "the img_align_celeba directory of 178x218 *.jpg files"
    if not root.is_dir():
        raise _data_error(root, expected, CELEBA_SOURCE, "CelebA directory not found")
    folder = root / "img_align_celeba" if (root / "img_align_celeba").is_dir() else root
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise _data_error(folder, expected, CELEBA_SOURCE, "no CelebA JPEGs found")
    note = ""
    if split == "train":
        files, note = _celeba_train_files(root, folder, files)
    files = files[:limit]
    image_lib = _pil(folder)
    top, left, height, width = CELEBA_CROP

    def decode(file: Path) -> np.ndarray:
        img = _open_image(image_lib, file, expected, CELEBA_SOURCE)
        if (img.height, img.width) != CELEBA_SIZE:
            raise _data_error(
                file,
                expected,
                CELEBA_SOURCE,
                f"not an aligned CelebA image ({img.width}x{img.height})",
            )
        img = img.convert("RGB").crop((left, top, left + width, top + height))
        img = img.resize((image_size, image_size), image_lib.BILINEAR)
        return _pil_to_array(img, 3)

    return DecodePlan("celeba", files, decode, (3, image_size, image_size),
                      f"celeba crop {CELEBA_CROP} bilinear {image_size}", note)


def load_celeba(path: str | Path, image_size: int = 64, limit: int | None = None,
                split: Literal["train", "all"] = "all") -> np.ndarray:
    """:func:`celeba_plan`'s images, decoded, as ``float32`` ``(N, 3, image_size, image_size)``
    in [-1, 1] (about 10 GB for all 202,599 at 64x64: runs keep them as ``uint8``)."""
    return _uint8_to_unit(celeba_plan(path, image_size, limit, split).decode_all())


def _open_image(image_lib, file: Path, expected: str, source: str):
    """Decode ``file``, once its header says it fits in ``MAX_IMAGE_PIXELS`` (a header can claim
    30000x30000 pixels in a few bytes: 2.7 GB decoded)."""
    try:
        img = image_lib.open(file)  # reads the header only
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise _data_error(file, expected, source, f"the image claims {img.width}x{img.height} pixels, more "
                              f"than the {MAX_IMAGE_PIXELS:,} sftrl decodes")
        img.load()
    except image_lib.DecompressionBombError as err:  # Pillow's own guard, at twice its default limit
        raise _data_error(file, expected, source, f"the image claims more pixels than the {MAX_IMAGE_PIXELS:,} "
                          f"sftrl decodes ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise _data_error(file, expected, source, f"cannot decode image ({err})") from err  # UnidentifiedImageError too
    return img


def _image_files(folder: Path) -> Iterator[Path]:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            yield p


def folder_plan(path: str | Path, image_size: int, channels: int = 3, limit: int | None = None) -> DecodePlan:
    """Any folder of images (searched recursively, sorted by path), center-cropped and resized.

    Files with an extension in ``IMAGE_EXTENSIONS`` are decoded (others are ignored; an image
    file that cannot be decoded is an error). Each image is converted to RGB (``channels=3``)
    or grayscale (``channels=1``), center-cropped to a square of its shorter side and resized
    to ``image_size`` with PIL's antialiased bilinear filter.
    """
    if image_size is None:
        raise ValueError("load_image_folder needs an image_size (set data.image_size)")
    image_size = _positive_size(image_size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    limit = _check_limit(limit)
    root = Path(path).expanduser()
    expected = f"a folder of image files ({', '.join(IMAGE_EXTENSIONS)})"
    source = FOLDER_SOURCE
    if not root.is_dir():
        raise _data_error(root, expected, source, "image folder not found")
    files = list(_image_files(root))[:limit]
    if not files:
        raise _data_error(root, expected, source, "no image files found")
    image_lib = _pil(root)

    def decode(file: Path) -> np.ndarray:
        img = _open_image(image_lib, file, expected, source)
        side = min(img.width, img.height)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        img = img.resize((image_size, image_size), image_lib.BILINEAR)
        return _pil_to_array(img, channels)

    return DecodePlan("folder", files, decode, (channels, image_size, image_size),
                      f"folder center-crop bilinear {image_size} channels {channels}")


def load_image_folder(
    path: str | Path, image_size: int, channels: int = 3, limit: int | None = None
) -> np.ndarray:
    """:func:`folder_plan`'s images, decoded, as ``float32`` ``(N, channels, image_size,
    image_size)`` in [-1, 1]."""
    return _uint8_to_unit(folder_plan(path, image_size, channels, limit).decode_all())


# ---------------------------------------------------------------------------------- dispatch


def load_image_dataset(
    name: str, path: str | Path | None, image_size: int | None = None, limit: int | None = None
) -> np.ndarray:
    """Load the image set ``name`` (``data.name``) from ``path`` (``data.path``).

    ``image_size`` (``data.image_size``) None keeps each set's own size (digits 8, MNIST 28,
    CIFAR-10 32, CelebA 64); folders need it. MNIST and CIFAR-10 are resized bilinearly when
    it differs. ``limit`` keeps the first ``limit`` images.

    Returns:
        ``float32`` array ``(N, C, H, W)`` in [-1, 1].
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; valid: {', '.join(IMAGE_DATASETS)}")
    image_size = _check_image_size(image_size)
    limit = _check_limit(limit)
    if name == "digits":
        return load_digits_images(image_size or 8)[:limit]
    if path is None:
        where = {
            "mnist": MNIST_SOURCE,
            "cifar10": CIFAR10_SOURCE,
            "celeba": CELEBA_SOURCE,
            "folder": FOLDER_SOURCE,
        }[name]
        raise DataError(f"dataset {name!r} needs its files: set data.path; {where}")
    if name == "mnist":
        x = load_mnist(path)[:limit]
    elif name == "cifar10":
        x = load_cifar10(path, limit=limit)
    elif name == "celeba":
        return load_celeba(path, image_size or 64, limit)
    else:
        if image_size is None:
            raise ValueError(
                "dataset 'folder' needs data.image_size (the side length to resize to)"
            )
        return load_image_folder(path, image_size, limit=limit)
    return x if image_size is None else _resize(x, image_size)
