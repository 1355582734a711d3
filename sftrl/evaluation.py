"""Evaluation of a sampler.

2-D data: SW2 (Table 1's "W2") with its noise floor, and exact W2 (:class:`ToyEvaluator`).
Images: FID and KID of ``trainer.eval_samples`` samples against the real training images, and a
grid of the same 64 chains each time (:class:`ImageEvaluator`; Table 3's protocol is 50K samples
with the Inception extractor). The extractor is the standard Inception when its weights are on
disk; for digits, without them, the digits CNN (its name says its FIDs are not comparable to
published ones); otherwise FID is skipped and the evaluation says why: a FID from a stand-in
network is never reported for a data set whose published FIDs are Inception FIDs.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sftrl.data.store import ImageStore
from sftrl.diffusion.schedules import SamplingSchedule
from sftrl.diffusion.step import sample, sample_batches
from sftrl.metrics.wasserstein import exact_w2, sw2_report
from sftrl.weights import NumpyState, load_numpy_state, tensor_view

# Real images the FID/KID reference holds at most (the first N of the training set): CIFAR-10's
# whole 50K training set, as in Table 3; CelebA's 162K-202K would cost ~10 GB of float32 at 64x64.
FID_REAL_MAX = 50_000
# Chains sampled at once during image evaluation: bounds the U-Net's activation memory.
IMAGE_EVAL_BATCH = 500
# KID: subsets of this many images (torchmetrics' default), fewer when a set is smaller.
KID_SUBSET_SIZE = 1000
# The sample grid of each image evaluation: its first GRID_IMAGES chains, GRID_COLUMNS a row.
GRID_IMAGES, GRID_COLUMNS = 64, 8


class NonFiniteSamples(ValueError):
    """A sampler drew NaN or infinite samples: no metric of them means anything."""


def check_finite(samples: np.ndarray) -> np.ndarray:
    """``samples`` ``(N, *D)`` as they are, or :class:`NonFiniteSamples` saying how many are not finite."""
    bad = ~np.isfinite(samples.reshape(len(samples), -1)).all(axis=1)
    if bad.any():
        raise NonFiniteSamples(f"{int(bad.sum())} of {len(samples)} samples are NaN or infinite")
    return samples


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    num_samples: int = 10_000
    draws: int = 5
    exact_w2_points: int = 2000
    seed: int = 0


SPREAD_POINTS = 2000  # the spread's draw where exact W2 (its usual draw) is off: the std to about 2%


def spread_ratio(fake: np.ndarray, real: np.ndarray) -> float:
    """The samples' spread against the data's: the mean over the dims of std(fake) / std(real)
    (below 1: under-dispersed, the mode-seeking a critic's reward can drive; above: too wide)."""
    return float(np.mean(fake.std(axis=0) / np.maximum(real.std(axis=0), 1e-12)))


class ToyEvaluator:
    """Scores sampler weights against fresh draws of the real distribution.

    SW2 is the mean and spread over ``draws`` independent (samples, data) pairs, with the
    data-vs-data floor measured the same way beside it: at 10K points the floor (about 0.7e-2
    for swiss roll) is as large as the paper's best number.
    """

    def __init__(self, sampler: nn.Module, schedule: SamplingSchedule, data_fn, data_shape, settings: EvalSettings):
        self.sampler = sampler.eval()
        self.tables = schedule.tables("cpu")
        self.data_fn = data_fn
        self.data_shape = tuple(data_shape)
        self.settings = settings
        self._floors: tuple[float, ...] | None = None  # data-vs-data: the same at every evaluation

    def sample(self, weights: NumpyState | None, n: int, seed: int) -> np.ndarray:
        if weights is not None:
            load_numpy_state(self.sampler, weights)
        generator = torch.Generator().manual_seed(seed)
        return check_finite(sample(self.sampler, self.tables, n, self.data_shape, generator=generator).numpy())

    def evaluate(self, weights: NumpyState | None) -> dict[str, float]:
        """``{"sw2_mean", "sw2_std", "sw2_min", "sw2_max", "sw2_floor_mean", "sw2_floor_std",
        "spread_ratio", "exact_w2"}``."""
        s = self.settings
        if weights is not None:
            load_numpy_state(self.sampler, weights)
        report = sw2_report(
            lambda n, seed: self.sample(None, n, seed),
            self.data_fn,
            n=s.num_samples,
            draws=s.draws,
            seed=s.seed,
            floors=self._floors,
        )
        self._floors = report.floor_draws
        out = {
            "sw2_mean": report.mean,
            "sw2_std": report.std,
            "sw2_min": report.min,
            "sw2_max": report.max,
            "sw2_floor_mean": report.floor_mean,
            "sw2_floor_std": report.floor_std,
        }
        # One more (samples, data) pair for exact W2 and the spread (SPREAD_POINTS where exact W2 is off).
        points = s.exact_w2_points or SPREAD_POINTS
        fake = self.sample(None, points, s.seed + 7919)
        real = self.data_fn(points, s.seed + 104729)
        out["spread_ratio"] = spread_ratio(fake, real)
        if s.exact_w2_points:
            out["exact_w2"] = exact_w2(fake, real, max_points=s.exact_w2_points, seed=s.seed)
        return out


@dataclasses.dataclass(frozen=True)
class ImageEvalSettings:
    num_samples: int = 10_000
    seed: int = 0
    batch_size: int = IMAGE_EVAL_BATCH
    kid_subset_size: int = KID_SUBSET_SIZE


class ImageEvaluator:
    """FID and KID of sampler weights against a fixed set of real images, and a grid of samples.

    Every evaluation draws ``num_samples`` images with the evaluation chain (no std floor) from
    the same seed, so successive evaluations share their noise and their differences are the
    sampler's; the first ``GRID_IMAGES`` of them are the grid, the same chains every time. The
    draw goes batch by batch straight into the extractor: at most one batch of float images is
    held. Returns ``{"fid", "kid_mean", "kid_std", "extractor", "num_real", "num_fake",
    "pictures"}``; ``extractor`` is the feature network's name, which says whether the FID is
    the standard Inception one; ``pictures`` is ``{"samples": uint8 grid (H, W) or (H, W, 3)}``,
    for the caller to save (it is not a metric).

    With no extractor (``extractor=None``, ``skipped`` saying why), an evaluation draws only the
    grid and returns ``{"extractor": "none", "fid_skipped": skipped, "pictures"}``.
    """

    def __init__(
        self,
        sampler: nn.Module,
        schedule: SamplingSchedule,
        real_images: np.ndarray | ImageStore,
        extractor: nn.Module | None,
        settings: ImageEvalSettings,
        *,
        device: str = "cpu",
        skipped: str = "",
    ):
        """``real_images``: the reference set, of which the first ``FID_REAL_MAX`` count (floats in
        [-1, 1], or an ``ImageStore``'s ``uint8``, read a batch at a time, never flipped)."""
        self.device = torch.device(device)
        self.sampler = sampler.to(self.device).eval()
        self.tables = schedule.tables(self.device)
        reference = real_images.images if isinstance(real_images, ImageStore) else real_images
        self.real_images = tensor_view(reference[:FID_REAL_MAX])  # (N_real, C, H, W) on CPU: a view, no copy
        self._real_features: torch.Tensor | None = None  # the reference's features: the same at every evaluation
        if self.real_images.dim() != 4:
            raise ValueError(f"real images must be (N, C, H, W), got {tuple(self.real_images.shape)}")
        self.data_shape = tuple(self.real_images.shape[1:])
        self.extractor = extractor.to(self.device).eval() if extractor is not None else None
        self.settings = settings
        self.skipped = skipped

    def sample(self, weights: NumpyState | None, n: int, seed: int) -> np.ndarray:
        """``(n, C, H, W)`` float32 samples (``weights`` None: the sampler's current weights)."""
        if weights is not None:
            load_numpy_state(self.sampler, weights)
        return np.concatenate([x.cpu().numpy() for x in self._draw(n, seed)])

    def _draw(self, n: int, seed: int):
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for x in sample_batches(self.sampler, self.tables, n, self.data_shape, generator=generator,
                                device=self.device, batch_size=self.settings.batch_size):
            if not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x.flatten(1))).any(dim=1).sum())
                raise NonFiniteSamples(f"{bad} of a batch of {len(x)} samples are NaN or infinite")
            yield x  # (b, C, H, W) on the device

    def evaluate(self, weights: NumpyState | None) -> dict[str, Any]:
        from sftrl.metrics.fid import extract_features, fid_kid_from_features
        from sftrl.pictures import grid_array

        s = self.settings
        if weights is not None:
            load_numpy_state(self.sampler, weights)
        n = s.num_samples if self.extractor is not None else min(GRID_IMAGES, s.num_samples)
        grid: list[np.ndarray] = []
        features = []
        for x in self._draw(n, s.seed):
            kept = sum(len(g) for g in grid)
            if kept < GRID_IMAGES:
                grid.append(x[: GRID_IMAGES - kept].cpu().numpy())
            if self.extractor is not None:
                features.append(extract_features(x, self.extractor, s.batch_size))  # (b, F) float64 on CPU
        pictures = {"samples": grid_array(np.concatenate(grid), nrow=GRID_COLUMNS)}
        if self.extractor is None:
            return {"extractor": "none", "fid_skipped": self.skipped, "pictures": pictures}
        if self._real_features is None:
            self._real_features = extract_features(self.real_images, self.extractor, s.batch_size)
        result = fid_kid_from_features(self._real_features, torch.cat(features),
                                       str(getattr(self.extractor, "name", type(self.extractor).__name__)),
                                       kid_subset_size=s.kid_subset_size, seed=s.seed)
        return {
            "fid": result.fid,
            "kid_mean": result.kid_mean,
            "kid_std": result.kid_std,
            "extractor": result.extractor,
            "num_real": result.num_real,
            "num_fake": result.num_fake,
            "pictures": pictures,
        }


def extractor_cache_dir(cfg) -> Path:
    """Where the digits extractor is cached: ``extractors/`` beside ``pretrain.cache_dir``
    (``~/.cache/sftrl/extractors`` by default), so a test's cache_dir isolates it too."""
    return Path(cfg.pretrain.cache_dir).expanduser().parent / "extractors"


def weights_cache_dir(cfg) -> Path:
    """Where ``sftrl weights`` puts network weights: ``weights/`` beside ``pretrain.cache_dir``
    (``~/.cache/sftrl/weights`` by default)."""
    return Path(cfg.pretrain.cache_dir).expanduser().parent / "weights"


def choose_extractor(cfg, data_shape: tuple[int, ...]) -> tuple[nn.Module | None, str]:
    """``(extractor, "")``, or ``(None, why FID is skipped)``.

    The standard Inception from ``trainer.fid_weights`` or the weights cache; else, for digits,
    the digits CNN (trained once and cached); else None: the published FIDs of MNIST, CIFAR-10
    and CelebA are Inception FIDs, and a stand-in network's number would not be comparable.
    A ``trainer.fid_weights`` that is missing or not the Inception's weights raises ``ValueError``.
    """
    from sftrl.metrics import fid

    given = cfg.trainer.fid_weights
    if given is not None and not Path(given).expanduser().is_file():
        raise ValueError(f"trainer.fid_weights '{given}' is not a file; fetch the Inception weights with "
                         f"`sftrl weights inception` (or set trainer.fid_weights=null to look in the cache)")
    inception = fid.inception_extractor_if_available(given, weights_cache_dir(cfg))
    if inception is not None:
        return inception, ""
    if cfg.data.name == "digits":
        return fid.digits_extractor(extractor_cache_dir(cfg), image_size=data_shape[-1]), ""
    places = " or ".join(str(p) for p in fid.inception_weights_paths(weights_cache_dir(cfg)))
    return None, (
        f"FID/KID skipped: the standard Inception extractor is not available (no weights at {places}; "
        f"a run never downloads them: `sftrl weights inception` fetches them once, or set "
        f"trainer.fid_weights=FILE), and no other extractor gives FIDs comparable to published ones for "
        f"{cfg.data.name!r}; sample grids are still drawn"
    )


def build_image_evaluator(cfg, init, real=None):
    """:class:`ImageEvaluator` for ``cfg``: FID/KID and a sample grid, or the grid alone and why
    FID is skipped (said once here, as a warning). ``real``: the training set where the caller
    holds it (else it is loaded: a memory map of the decode cache, or the arrays)."""
    from sftrl.components import resolve_device
    from sftrl.data import load_real_data
    from sftrl.models import attach_variance, build_unet
    from sftrl.plan import Seeds, schedule_of

    extractor, reason = choose_extractor(cfg, init.data_shape)
    if extractor is None:
        print(f"warning: {reason}", file=sys.stderr)
        real = np.empty((0, *init.data_shape), dtype=np.uint8)  # no FID: no reference set is read
    if real is None:
        real = load_real_data(cfg, progress=False)  # (N, C, H, W): its first FID_REAL_MAX are the reference
    sampler = attach_variance(build_unet(cfg, init.data_shape), cfg, init.data_shape)  # learned stds too
    if init.sampler_state is not None:
        load_numpy_state(sampler, init.sampler_state)
    settings = ImageEvalSettings(num_samples=cfg.trainer.eval_samples, seed=Seeds(cfg.seed).evaluation)
    return ImageEvaluator(sampler, schedule_of(cfg), real, extractor, settings, device=resolve_device(cfg),
                          skipped=reason)


def build_evaluator(cfg, init, real=None):
    """The evaluator for ``cfg``'s data: SW2 for 2-D sets, FID/KID (or the reason why not) for
    images, against ``real`` (the training set, loaded when not given). ``evaluator.evaluate(weights) -> dict``."""
    from sftrl.data import fresh_data_fn
    from sftrl.models import build_networks
    from sftrl.plan import Seeds, schedule_of

    if not cfg.is_toy:
        return build_image_evaluator(cfg, init, real)
    sampler, _, _ = build_networks(cfg, init.data_shape)
    t = cfg.trainer
    settings = EvalSettings(t.eval_samples, t.eval_draws, t.exact_w2_points, seed=Seeds(cfg.seed).evaluation)
    return ToyEvaluator(sampler, schedule_of(cfg), fresh_data_fn(cfg), init.data_shape, settings)
