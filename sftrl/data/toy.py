"""2-D toy datasets used by the paper's toy experiments.

Shortcut Fine-Tuning (SFT-PG) evaluates on 2-D toy data with a training set of
10K points (``n = 10_000``); the reference implementation builds it as

* swiss roll: ``make_swiss_roll(10_000, noise=0.05)[:, [0, 2]] / 20``
* two moons: ``make_moons(10_000, noise=0.05) / 2``

and this module reproduces those constructions exactly, with an explicit seed.
The Gaussian cluster is a tiny isotropic blob N((0.5, 0.5), 0.01^2 I) used as an
easy target.

Every function returns a ``float32`` array of shape ``(n, 2)`` and is
deterministic for a fixed ``seed`` (different seeds give different draws).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "TOY_DATASETS",
    "gaussian_cluster",
    "make_toy",
    "swiss_roll",
    "two_moons",
]


def _check_n(n: int) -> int:
    n = int(n)
    if n <= 0:
        raise ValueError(f"n must be a positive integer, got {n}")
    return n


def swiss_roll(n: int, *, seed: int, noise: float = 0.05) -> np.ndarray:
    """Swiss roll in the plane, as in the paper (training set: n = 10K points).

    ``make_swiss_roll(n, noise=noise, random_state=seed)``, columns (0, 2), divided
    by 20. The spiral parameter t lies in [1.5 pi, 4.5 pi], so the first coordinate
    lies in about [-0.47, 0.63] and the second in about [-0.55, 0.71].
    ``noise`` is the standard deviation of sklearn's Gaussian noise *before* the
    division by 20.

    Returns:
        ``float32`` array of shape ``(n, 2)``.
    """
    from sklearn.datasets import make_swiss_roll  # lazily: sklearn's import is ~2 s per process

    x, _ = make_swiss_roll(_check_n(n), noise=noise, random_state=seed)
    return (x[:, [0, 2]] / 20.0).astype(np.float32)


def two_moons(n: int, *, seed: int, noise: float = 0.05) -> np.ndarray:
    """Two interleaving half circles, as in the paper (training set: n = 10K points).

    ``make_moons(n, noise=noise, random_state=seed) / 2``: first coordinate in about
    [-0.5, 1.0], second in about [-0.25, 0.5] (plus noise of std ``noise / 2``).

    Returns:
        ``float32`` array of shape ``(n, 2)``.
    """
    from sklearn.datasets import make_moons

    x, _ = make_moons(_check_n(n), noise=noise, random_state=seed)
    return (x / 2.0).astype(np.float32)


def gaussian_cluster(
    n: int,
    *,
    seed: int,
    center: tuple[float, float] = (0.5, 0.5),
    std: float = 0.01,
) -> np.ndarray:
    """Isotropic Gaussian blob N(center, std^2 I) (10K points for a training set).

    Drawn with ``np.random.default_rng(seed)``.

    Returns:
        ``float32`` array of shape ``(n, len(center))`` -- ``(n, 2)`` by default.
    """
    rng = np.random.default_rng(seed)
    mu = np.asarray(center, dtype=np.float64)
    x = mu + float(std) * rng.standard_normal((_check_n(n), mu.shape[0]))
    return x.astype(np.float32)


TOY_DATASETS: dict[str, Callable[..., np.ndarray]] = {
    "swissroll": swiss_roll,
    "moons": two_moons,
    "gaussian": gaussian_cluster,
}


def make_toy(name: str, n: int, *, seed: int) -> np.ndarray:
    """Draw ``n`` points of the toy dataset ``name`` (a key of ``TOY_DATASETS``).

    The paper's training set is ``make_toy(name, 10_000, seed=...)``.

    Returns:
        ``float32`` array of shape ``(n, 2)``.

    Raises:
        ValueError: ``name`` is not a key of ``TOY_DATASETS``; the message lists the
            valid names.
    """
    try:
        fn = TOY_DATASETS[name]
    except KeyError:
        valid = ", ".join(sorted(TOY_DATASETS))
        raise ValueError(f"unknown toy dataset {name!r}; valid names: {valid}") from None
    return fn(n, seed=seed)
