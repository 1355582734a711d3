"""Real data q_0: the toy generators and the image sets.

The toy sets and the 8x8 digits are small ``float32`` arrays. The other image sets are an
``ImageStore`` (``sftrl.data.store``): ``uint8`` images, memory-mapped from a decode cache
(``sftrl.data.cache``) for CelebA and folders, converted to float a batch at a time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sftrl.data.store import ImageStore
from sftrl.data.toy import TOY_DATASETS, make_toy

# The sets whose training images the authors' code flips left-right at random (data.flip: null).
FLIPPED_BY_DEFAULT = ("cifar10", "celeba")
# Each set's own side length (data.image_size: null); a folder has none.
NATIVE_SIZE = {"digits": 8, "mnist": 28, "cifar10": 32, "celeba": 64}

RealData = np.ndarray | ImageStore


def flips(cfg) -> bool:
    """Whether real images are flipped left-right at random (``data.flip``, or the set's recipe)."""
    return cfg.data.flip if cfg.data.flip is not None else cfg.data.name in FLIPPED_BY_DEFAULT


def data_cache_dir(cfg) -> Path:
    """Where decoded images are cached: ``data/`` beside ``pretrain.cache_dir``
    (``~/.cache/sftrl/data`` by default), so a test's cache_dir isolates it too."""
    return Path(cfg.pretrain.cache_dir).expanduser().parent / "data"


def image_shape(cfg, channels: int) -> tuple[int, int, int]:
    """``(C, H, W)`` of ``cfg``'s images without reading them (``channels``: the sampler's)."""
    size = cfg.data.image_size or NATIVE_SIZE[cfg.data.name]
    return (channels, size, size)


def load_real_data(cfg, *, progress: bool = True) -> RealData:
    """The training set of ``cfg.data``: ``float32`` ``(N, *data_shape)`` for the toy sets and
    digits, an ``ImageStore`` ``(N, C, H, W)`` for the other image sets."""
    from sftrl.data import images

    d = cfg.data
    if d.name in TOY_DATASETS:
        return make_toy(d.name, d.num_train, seed=d.seed)
    if d.name == "digits":
        return images.load_image_dataset("digits", None, image_size=d.image_size, limit=d.limit)
    if d.path is None:
        source = {"mnist": images.MNIST_SOURCE, "cifar10": images.CIFAR10_SOURCE, "celeba": images.CELEBA_SOURCE,
                  "folder": images.FOLDER_SOURCE}[d.name]
        raise images.DataError(f"dataset {d.name!r} needs its files: set data.path; {source}")
    if d.name in ("mnist", "cifar10"):  # arrays already: uint8 in memory (47 MB, 150 MB)
        raw = (images.load_mnist_uint8(d.path) if d.name == "mnist" else images.load_cifar10_uint8(d.path, limit=d.limit))
        raw = raw[: d.limit]
        array = raw if d.image_size in (None, raw.shape[-1]) else images.resize_uint8(raw, d.image_size)
    else:
        if d.name == "folder" and d.image_size is None:
            raise ValueError("dataset 'folder' needs data.image_size (the side length to resize to)")
        plan = (images.celeba_plan(d.path, d.image_size or 64, d.limit, d.split) if d.name == "celeba"
                else images.folder_plan(d.path, d.image_size, limit=d.limit))
        if plan.note:
            print(f"note: {plan.note}", file=sys.stderr)
        from sftrl.data.cache import cached_images

        array = cached_images(plan, data_cache_dir(cfg), progress=progress)
    if len(array) == 0:
        raise images.DataError(f"data.path '{d.path}': the {d.name} files there hold no images")
    return ImageStore(array, flip=flips(cfg))


def fresh_data_fn(cfg):
    """``(n, seed) -> (n, *D)`` fresh draws of the real distribution (toy sets), for evaluation."""
    name = cfg.data.name
    if name not in TOY_DATASETS:
        raise ValueError(f"fresh draws exist only for the toy sets {sorted(TOY_DATASETS)}, not {name!r}")
    return lambda n, seed: make_toy(name, n, seed=seed)
