"""FID and KID between image sets, via torchmetrics, with a named, pluggable feature extractor.

Code name -> symbol
===================

==========================  ======================================================
code                        meaning
==========================  ======================================================
``FIDResult.fid``           Frechet distance between Gaussians fitted to the features of
                            the real and the generated images (Table 3's "FID" when the
                            extractor is the standard Inception pool3).
``FIDResult.kid_mean/std``  Kernel Inception Distance: unbiased MMD^2 with the cubic
                            polynomial kernel, mean and std over random subsets.
``FIDResult.extractor``     The extractor's ``name``. Every report carries it, so a FID
                            computed with a stand-in network is never passed off as the
                            standard (Inception) one.
==========================  ======================================================

Extractors map images in [-1, 1] ``(B, C, H, W)`` to features ``(B, F)``:

* ``inception_extractor_if_available()``: the TF FID Inception (pool3, 2048-d;
  ``sftrl.metrics.inception``, pinned to torch-fidelity's outputs), returned only when its weights
  file is already on disk (``sftrl weights inception`` fetches it once); it never downloads.
* ``digits_extractor(cache_dir)``: a small CNN classifier trained deterministically on
  scikit-learn's digits, whose penultimate layer is the feature. Its FIDs are useful for comparing
  samplers on digits and are not comparable with published (Inception) FIDs; its name says so.

``fid_kid`` runs the extractor once per image set (batched, no grad) and hands the features to
torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` through a pass-through
feature module, so the extraction is shared between the two metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import time
import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from sftrl.files import torch_save_atomic
from sftrl.metrics.inception import INCEPTION_WEIGHTS_FILE

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DIGITS_EXTRACTOR_VERSION",
    "DigitsFeatureExtractor",
    "DigitsTrainConfig",
    "FIDResult",
    "FeatureExtractor",
    "InceptionExtractor",
    "digits_extractor",
    "extract_features",
    "fid_kid",
    "fid_kid_from_features",
    "inception_extractor_if_available",
    "inception_weights_paths",
    "train_digits_extractor",
    "to_unit_range",
]

DEFAULT_CACHE_DIR = Path("~/.cache/sftrl/extractors")
DIGITS_EXTRACTOR_VERSION = "digits-cnn-v1"
# The weights file of the FID Inception (the name torch-fidelity gives it; sha256 starts 6726825d).
INCEPTION_NAME = "inception-v3-compat (the TF FID Inception, pool3 2048-d: the standard FID)"


@runtime_checkable
class FeatureExtractor(Protocol):
    """An ``nn.Module`` mapping images ``(B, C, H, W)`` in [-1, 1] to features ``(B, F)``.

    ``name`` goes into every report; ``num_features`` is F. The extractors here also accept
    ``uint8`` images 0..255 (what torchmetrics feeds a custom module with ``normalize=False``),
    via :func:`to_unit_range`.
    """

    name: str
    num_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Images as float in [-1, 1]: ``uint8`` 0..255 is mapped by ``v / 127.5 - 1``, floats are
    taken to be in [-1, 1] already and clamped there (samplers overshoot slightly)."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float().clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------- Inception


class InceptionExtractor(nn.Module):
    """The standard FID network behind the [-1, 1] float interface.

    Wraps a torch-fidelity-style Inception (``inception``: uint8 ``(B, 3, H, W)`` 0..255 ->
    ``(B, 2048)``; it resizes to 299 itself). Float images in [-1, 1] are quantised to 8 bits as
    a saved PNG would be; one-channel images are repeated to RGB.
    """

    def __init__(self, inception: nn.Module, name: str = INCEPTION_NAME, num_features: int = 2048):
        super().__init__()
        self.inception = inception
        self.name = name
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            x = ((to_unit_range(x) + 1.0) * 127.5).round().to(torch.uint8)  # (B, C, H, W) 0..255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.inception(x).reshape(x.shape[0], -1).float()  # (B, 2048)


def torch_hub_inception_weights_path() -> Path:
    """Where torch-fidelity keeps the same weights file: ``<torch hub dir>/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def inception_weights_paths(weights_dir: str | Path | None = None) -> list[Path]:
    """Where an Inception weights file is looked for, in order: ``weights_dir`` (sftrl's cache,
    where ``sftrl weights inception`` puts it), then torch-fidelity's cache."""
    paths = [Path(weights_dir).expanduser() / INCEPTION_WEIGHTS_FILE] if weights_dir is not None else []
    return [*paths, torch_hub_inception_weights_path()]


def inception_extractor_if_available(
    weights_path: str | Path | None = None, weights_dir: str | Path | None = None
) -> InceptionExtractor | None:
    """The standard FID Inception (:class:`sftrl.metrics.inception.FIDInceptionV3`) from a
    weights file on disk, or None when there is none. Never downloads.

    ``weights_path``: that file (missing: None); else the first of
    :func:`inception_weights_paths` that exists. A file that is not the network's weights raises
    ``ValueError`` naming it.
    """
    from sftrl.metrics.inception import load_fid_inception

    candidates = [Path(weights_path).expanduser()] if weights_path is not None else inception_weights_paths(weights_dir)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    return InceptionExtractor(load_fid_inception(path))


# ---------------------------------------------------------------------------------- digits


@dataclasses.dataclass(frozen=True)
class DigitsTrainConfig:
    """How the digits extractor is trained; its fields (and the version) key the cache file."""

    image_size: int = 8  # input side: the digits benchmark runs at 8 or 16
    seed: int = 0  # seeds the split, the initialisation and the shuffling
    epochs: int = 30  # full passes over the training split (about 97-98% held out by then)
    batch_size: int = 64
    lr: float = 2e-3  # Adam, decayed to 0 by a cosine schedule
    width: int = 16  # channels of the first convolution (then 2x and 4x)
    num_features: int = 64  # size of the penultimate layer = the feature
    test_fraction: float = 0.2  # stratified held-out split used for the reported accuracy


class DigitsFeatureExtractor(nn.Module):
    """A small CNN classifier for the digits; its penultimate layer is the feature.

    ``forward``: ``(B, 1, s, s)`` in [-1, 1] (or uint8) -> ``(B, num_features)`` (post-ReLU);
    ``logits``: -> ``(B, 10)``. Layers: conv3x3(1->w), conv3x3 stride 2 (w->2w), conv3x3 stride 2
    (2w->4w), adaptive average pool to 2x2, Linear(16w -> F) + ReLU (the feature), Linear(F -> 10);
    ReLU after every convolution.
    """

    def __init__(self, image_size: int = 8, width: int = 16, num_features: int = 64):
        super().__init__()
        self.image_size = int(image_size)
        self.num_features = int(num_features)
        self.name = (
            f"{DIGITS_EXTRACTOR_VERSION} ({self.image_size}x{self.image_size}, {self.num_features}-d; "
            "not Inception: FID values are not comparable to published FIDs)"
        )
        self.heldout_accuracy = float("nan")  # set by training or by loading from the cache
        self.train_seconds = float("nan")
        # shapes: (B, 1, s, s) -> (B, w, s, s) -> (B, 2w, s/2, s/2) -> (B, 4w, s/4, s/4)
        # -> (B, 4w, 2, 2) -> (B, 16w) -> (B, F)
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * width, self.num_features),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(self.num_features, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (1, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{DIGITS_EXTRACTOR_VERSION} expects (B, {expected}), got {tuple(x.shape)}"
            )
        return self.features(to_unit_range(x))  # (B, F)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self(x))  # (B, 10)


def _digits_split(cfg: DigitsTrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from sftrl.data.images import load_digits_images

    x = load_digits_images(cfg.image_size)  # (1797, 1, s, s) in [-1, 1]
    y = load_digits().target.astype(np.int64)
    return train_test_split(x, y, test_size=cfg.test_fraction, stratify=y, random_state=cfg.seed)


@torch.no_grad()
def _accuracy(model: DigitsFeatureExtractor, x: np.ndarray, y: np.ndarray) -> float:
    pred = model.logits(torch.from_numpy(x)).argmax(dim=1)
    return float((pred == torch.from_numpy(y)).float().mean())


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``(B, C, H, W)`` by up to ``max_shift`` pixels, filling with -1."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # background of the digits is -1
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def train_digits_extractor(cfg: DigitsTrainConfig = DigitsTrainConfig()) -> DigitsFeatureExtractor:
    """Train the digits CNN on a stratified split of sklearn's digits, deterministically on CPU.

    Cross-entropy, Adam with a cosine learning-rate decay, ``cfg.epochs`` shuffled passes, each
    image shifted by up to ``image_size // 8`` pixels (one original digit pixel). Training runs
    single-threaded, which is faster for a net this small and keeps the weights independent of
    the machine's core count; the thread count and the global torch RNG are restored afterwards.
    The returned model (eval mode) has ``heldout_accuracy`` (on the ``cfg.test_fraction`` split)
    and ``train_seconds`` set.
    """
    x_train, x_test, y_train, y_test = _digits_split(cfg)
    max_shift = max(1, cfg.image_size // 8)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = DigitsFeatureExtractor(cfg.image_size, cfg.width, cfg.num_features)
        generator = torch.Generator().manual_seed(cfg.seed)
        xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
        batches = torch.arange(len(xs)).split(cfg.batch_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * len(batches))
        model.train()
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(xs), generator=generator).split(cfg.batch_size):
                x = _random_shift(xs[idx], max_shift, generator)  # (b, 1, s, s)
                loss = F.cross_entropy(model.logits(x), ys[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        model.train_seconds = time.perf_counter() - start
        model.heldout_accuracy = _accuracy(model, x_test, y_test)
    finally:
        torch.set_num_threads(threads)
    return model


def _cache_file(cache_dir: Path, cfg: DigitsTrainConfig) -> tuple[Path, dict]:
    key = {"version": DIGITS_EXTRACTOR_VERSION, **dataclasses.asdict(cfg)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"{DIGITS_EXTRACTOR_VERSION}-{cfg.image_size}px-{digest}.pt", key


def _load_cached(file: Path, key: dict, cfg: DigitsTrainConfig) -> DigitsFeatureExtractor | None:
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        warnings.warn(
            f"ignoring unreadable extractor cache {file} ({err}); retraining", stacklevel=3
        )
        return None
    if not isinstance(payload, dict) or payload.get("key") != key:
        warnings.warn(f"extractor cache {file} does not match its key; retraining", stacklevel=3)
        return None
    model = DigitsFeatureExtractor(cfg.image_size, cfg.width, cfg.num_features)
    model.load_state_dict(payload["state_dict"])
    model.heldout_accuracy = float(payload["heldout_accuracy"])
    model.train_seconds = float(payload["train_seconds"])
    return model.eval()


def digits_extractor(
    cache_dir: str | Path | None = None, image_size: int = 8, **train_options
) -> DigitsFeatureExtractor:
    """The digits feature extractor, loaded from ``cache_dir`` or trained once and cached there.

    The cache file ``<cache_dir>/digits-cnn-v1-<s>px-<hash>.pt`` is keyed by the version and every
    :class:`DigitsTrainConfig` field (``train_options`` overrides them), so a changed recipe never
    loads stale weights. ``cache_dir`` None: ``~/.cache/sftrl/extractors``. The file is written
    atomically (temp file + rename), so concurrent runs at worst train twice.
    """
    cfg = DigitsTrainConfig(image_size=int(image_size), **train_options)
    folder = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    file, key = _cache_file(folder, cfg)
    if file.is_file():
        model = _load_cached(file, key, cfg)
        if model is not None:
            return model
    model = train_digits_extractor(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "key": key,
        "state_dict": model.state_dict(),
        "heldout_accuracy": model.heldout_accuracy,
        "train_seconds": model.train_seconds,
    }
    torch_save_atomic(payload, file)
    return model


# -------------------------------------------------------------------------------- FID / KID


@dataclasses.dataclass(frozen=True)
class FIDResult:
    """FID and KID of a generated set against a real one, and the extractor that produced them."""

    fid: float
    kid_mean: float
    kid_std: float
    extractor: str
    num_real: int
    num_fake: int
    kid_subset_size: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _PrecomputedFeatures(nn.Module):
    """Pass-through "feature network": torchmetrics receives features that were extracted already."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _as_images(images: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dim() != 4:
        raise ValueError(f"{what} images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if len(x) < 2:
        raise ValueError(f"{what} needs at least 2 images for FID/KID, got {len(x)}")
    return x


def _module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(
    images: torch.Tensor | np.ndarray, extractor: nn.Module, batch_size: int = 500
) -> torch.Tensor:
    """Features ``(N, F)`` float64 on CPU of images ``(N, C, H, W)`` (float in [-1, 1] or uint8).

    Runs in eval mode (the extractor's mode is restored), batch by batch on the extractor's device.
    """
    x = torch.as_tensor(images)
    device = _module_device(extractor)
    was_training = extractor.training
    extractor.eval()
    try:
        parts = [extractor(batch.to(device)).double().cpu() for batch in x.split(batch_size)]
    finally:
        extractor.train(was_training)
    return torch.cat(parts)


def fid_kid(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    extractor: FeatureExtractor,
    *,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    batch_size: int = 500,
    seed: int = 0,
    real_features: torch.Tensor | None = None,
) -> FIDResult:
    """FID and KID between ``real`` and ``fake`` images ``(N, C, H, W)`` in [-1, 1].

    Features come from ``extractor`` (see :class:`FeatureExtractor`); the distances are
    torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` (cubic polynomial
    kernel, ``kid_subsets`` subsets of ``min(kid_subset_size, N_real, N_fake)`` images, drawn
    with torch's RNG seeded by ``seed`` inside a forked RNG state, so the result is reproducible
    and the caller's RNG is untouched). Float images are clamped to [-1, 1].
    """
    if not (isinstance(extractor, nn.Module) and isinstance(extractor, FeatureExtractor)):
        raise TypeError("extractor must be an nn.Module with `name: str` and `num_features: int`")
    real_x, fake_x = _as_images(real, "real"), _as_images(fake, "fake")
    if real_x.shape[1:] != fake_x.shape[1:]:
        raise ValueError(
            f"real and fake images differ in shape: {tuple(real_x.shape[1:])} vs {tuple(fake_x.shape[1:])}"
        )
    # (N_real, F); a caller scoring many samplers against one reference passes its features
    real_f = real_features if real_features is not None else extract_features(real_x, extractor, batch_size)
    fake_f = extract_features(fake_x, extractor, batch_size)  # (N_fake, F)
    return fid_kid_from_features(real_f, fake_f, extractor.name, kid_subset_size=kid_subset_size,
                                 kid_subsets=kid_subsets, seed=seed)


def fid_kid_from_features(
    real_f: torch.Tensor,
    fake_f: torch.Tensor,
    extractor_name: str,
    *,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
) -> FIDResult:
    """FID and KID from features already extracted (``(N_real, F)``, ``(N_fake, F)``): what
    :func:`fid_kid` does after its extraction, for a caller that extracts batch by batch."""
    if real_f.dim() != 2 or fake_f.dim() != 2 or real_f.shape[1] != fake_f.shape[1]:
        raise ValueError(f"features must be (N, F) with one F, got {tuple(real_f.shape)} and {tuple(fake_f.shape)}")
    num_features = real_f.shape[1]
    subset_size = min(kid_subset_size, len(real_f), len(fake_f))

    fid = FrechetInceptionDistance(feature=_PrecomputedFeatures(num_features), normalize=True)
    with warnings.catch_warnings():
        # KID warns that it keeps all features in memory; here they are in memory already.
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(
            feature=_PrecomputedFeatures(num_features),
            subsets=kid_subsets,
            subset_size=subset_size,
            normalize=True,
        )
    for metric in (fid, kid):
        metric.update(real_f, real=True)
        metric.update(fake_f, real=False)
    fid_value = float(fid.compute())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return FIDResult(
        fid=fid_value,
        kid_mean=float(kid_mean),
        kid_std=float(kid_std),
        extractor=extractor_name,
        num_real=len(real_f),
        num_fake=len(fake_f),
        kid_subset_size=subset_size,
    )
