"""Wasserstein distances between point clouds, as used to score the toy experiments.

Code name -> paper symbol
=========================

==========================  ======================================================
code                        paper
==========================  ======================================================
``sliced_w2``               "W2" of Table 1: the *sliced* 2-Wasserstein distance
                            SW_2(p_theta, q) = (E_u[W_2^2(u#p, u#q)])^(1/2), u uniform
                            on the unit sphere, estimated with 100 random
                            projections by POT (``ot.sliced_wasserstein_distance``,
                            ``n_projections=100, p=2``) on 10K vs 10K points.
``exact_w2``                W_2(p, q), the exact 2-Wasserstein distance (network
                            simplex on a subsample; not what Table 1 reports).
``sw2_report``              SW_2 mean +- std over independent draws, with the
                            data-vs-data noise floor SW_2(q_n, q'_n).
``SW2Report.floor_mean``    SW_2 between two independent n-point draws of the data
                            distribution q: the smallest value a perfect sampler
                            can be expected to score (not in the paper).
``gaussian_w2_closed_form`` W_2(N(m1, diag s1^2), N(m2, diag s2^2))
                            = (|m1 - m2|^2 + sum_i (s1_i - s2_i)^2)^(1/2).
==========================  ======================================================

Reading the paper's number: the SFT-PG swiss-roll result of 0.64e-2 is an SW_2
estimate from 10K generated points against 10K data points (the reference code
compares against its 10K-point training set, with unseeded projections). Two
independent 10K-point draws of the swiss roll itself score about 0.6-0.9e-2 on
average over 5 draws (single draws about 0.5-1.3e-2), so 0.64e-2 is at the
data-vs-data noise floor and a reported value must be read beside that floor --
``sw2_report`` returns both.

All functions are pure: numpy arrays in, Python floats out; no config, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import ot

__all__ = [
    "SW2Report",
    "exact_w2",
    "gaussian_w2_closed_form",
    "sliced_w2",
    "sw2_report",
]

# POT's network-simplex result code for an optimal solution (others: 0 infeasible,
# 2 unbounded, 3 "numItermax reached before optimality").
_EMD_OPTIMAL = 1
# ot.emd2 silently returns a non-optimal cost when it hits numItermax (default 1e5);
# 5K vs 5K points needs about 1e7 iterations. The limit is a cap, not a cost: the
# solver stops as soon as it is optimal.
_MIN_ITERMAX = 10_000_000
_ITERMAX_PER_PAIR = 10


def _as_points(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def _check_same_dim(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: x is {x.shape}, y is {y.shape}")


def sliced_w2(x: np.ndarray, y: np.ndarray, *, n_projections: int = 100, seed: int) -> float:
    """Sliced 2-Wasserstein distance SW_2 between point clouds ``x`` and ``y``.

    Exactly the paper's Table 1 "W2": ``ot.sliced_wasserstein_distance(x, y,
    n_projections=n_projections, p=2, seed=seed)`` with uniform weights. It is
    (mean over projections of the 1-D W_2^2)^(1/2), with directions drawn uniformly
    on the unit sphere from ``seed``. Not the exact W_2.

    Args:
        x: ``(n, d)`` array.
        y: ``(m, d)`` array (``m`` may differ from ``n``).
        n_projections: number of random directions (the paper uses 100).
        seed: seed of the random directions.
    """
    xs = _as_points(x, "x")
    ys = _as_points(y, "y")
    _check_same_dim(xs, ys)
    return float(
        ot.sliced_wasserstein_distance(xs, ys, n_projections=int(n_projections), p=2, seed=seed)
    )


def _emd2_checked(a: np.ndarray, b: np.ndarray, cost: np.ndarray, *, num_itermax: int) -> float:
    """``ot.emd2(a, b, cost)`` that raises unless POT reports an optimal solution.

    Raises:
        RuntimeError: the network simplex stopped without optimality (for example
            numItermax reached), so the returned cost would not be the OT cost.
    """
    value, log = ot.emd2(a, b, cost, numItermax=int(num_itermax), log=True)
    code = log.get("result_code")
    if code != _EMD_OPTIMAL or log.get("warning"):
        raise RuntimeError(
            f"ot.emd2 did not converge (result_code={code}, warning={log.get('warning')!r}, "
            f"numItermax={int(num_itermax)}, problem {cost.shape[0]}x{cost.shape[1]})"
        )
    return float(value)


def _subsample(x: np.ndarray, max_points: int, rng: np.random.Generator) -> np.ndarray:
    if x.shape[0] <= max_points:
        return x
    return x[rng.choice(x.shape[0], size=max_points, replace=False)]


def exact_w2(x: np.ndarray, y: np.ndarray, *, max_points: int = 2000, seed: int) -> float:
    """Exact 2-Wasserstein distance W_2 between the empirical measures of ``x`` and ``y``.

    Each cloud larger than ``max_points`` is replaced by a uniform random subsample
    (without replacement, independent for ``x`` and ``y``, drawn from ``seed``) of
    ``max_points`` points; clouds at or under the limit are used whole. Weights are
    uniform and the cost is the squared Euclidean distance, so the result is
    ``sqrt(min_pi sum pi_ij |x_i - y_j|^2)``, solved by ``ot.emd2`` with an
    iteration cap that scales with the problem size.

    Args:
        x: ``(n, d)`` array.
        y: ``(m, d)`` array.
        max_points: subsample size cap per cloud (memory and time grow as n*m).
        seed: seed of the subsampling.

    Raises:
        RuntimeError: POT did not reach an optimal transport plan.
    """
    xs = _as_points(x, "x")
    ys = _as_points(y, "y")
    _check_same_dim(xs, ys)
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    rng = np.random.default_rng(seed)
    xs = _subsample(xs, int(max_points), rng)
    ys = _subsample(ys, int(max_points), rng)
    a = np.full(xs.shape[0], 1.0 / xs.shape[0])
    b = np.full(ys.shape[0], 1.0 / ys.shape[0])
    cost = ot.dist(xs, ys, metric="sqeuclidean")
    num_itermax = max(_MIN_ITERMAX, _ITERMAX_PER_PAIR * xs.shape[0] * ys.shape[0])
    value = _emd2_checked(a, b, cost, num_itermax=num_itermax)
    return math.sqrt(max(value, 0.0))


@dataclass(frozen=True)
class SW2Report:
    """SW_2 of a sampler against data over several draws, with the data-vs-data floor.

    Attributes:
        mean, std, min, max: statistics of ``draws`` (``std`` uses ddof=1; 0.0 for a
            single draw).
        draws: SW_2(generated, data) per draw.
        floor_mean, floor_std: the same statistics of SW_2(data, independent data).
        floor_draws: SW_2(data, independent data) per draw (pass them back as ``floors`` to
            skip recomputing them: they depend only on the data and the seeds).
    """

    mean: float
    std: float
    min: float
    max: float
    draws: tuple[float, ...]
    floor_mean: float
    floor_std: float
    floor_draws: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, float | list[float]]:
        d = asdict(self)
        d["draws"] = list(self.draws)
        d["floor_draws"] = list(self.floor_draws)
        return d


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def sw2_report(
    sample_fn: Callable[[int, int], np.ndarray],
    data_fn: Callable[[int, int], np.ndarray],
    *,
    n: int = 10_000,
    draws: int = 5,
    n_projections: int = 100,
    seed: int = 0,
    floors: Sequence[float] | None = None,
) -> SW2Report:
    """SW_2 of ``sample_fn`` against ``data_fn`` over ``draws`` draws, beside the floor.

    For draw k, four seeds (distinct across all draws) and one projection seed are
    derived deterministically from ``seed``:

    * ``draws[k] = SW_2(sample_fn(n, s_k), data_fn(n, d_k))``
    * ``floor[k] = SW_2(data_fn(n, a_k), data_fn(n, b_k))`` -- two independent data
      draws, i.e. what a perfect sampler would score.

    Both use the same ``n_projections`` directions (projection seed p_k), so the
    floor is the same estimator on data-vs-data.

    Args:
        sample_fn: ``(n, seed) -> (n, d)`` generated samples.
        data_fn: ``(n, seed) -> (n, d)`` fresh real data.
        n: points per cloud (the paper: 10K).
        draws: number of independent draws.
        n_projections: directions per SW_2 estimate (the paper: 100).
        seed: master seed.
        floors: the ``floor_draws`` of an earlier report with the same ``data_fn``, ``n``,
            ``draws``, ``n_projections`` and ``seed`` (the floor is then not recomputed).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if floors is not None and len(floors) != draws:
        raise ValueError(f"{len(floors)} cached floors for {draws} draws")
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    # 4 * draws distinct data/sample seeds (no two draws ever share a cloud), plus one
    # projection seed per draw; all below 2**31 so any seed consumer accepts them.
    cloud_seeds = rng.choice(2**31, size=(int(draws), 4), replace=False)
    proj_seeds = rng.integers(2**31, size=int(draws))
    seeds = list(zip(cloud_seeds.tolist(), proj_seeds.tolist(), strict=True))
    values = [
        sliced_w2(sample_fn(n, s_k), data_fn(n, d_k), n_projections=n_projections, seed=p_k)
        for (s_k, d_k, _, _), p_k in seeds
    ]
    if floors is None:
        floors = [
            sliced_w2(data_fn(n, a_k), data_fn(n, b_k), n_projections=n_projections, seed=p_k)
            for (_, _, a_k, b_k), p_k in seeds
        ]
    return SW2Report(
        mean=float(np.mean(values)),
        std=_std(values),
        min=float(np.min(values)),
        max=float(np.max(values)),
        draws=tuple(values),
        floor_mean=float(np.mean(floors)),
        floor_std=_std(floors),
        floor_draws=tuple(floors),
    )


def gaussian_w2_closed_form(
    m1: Sequence[float] | np.ndarray,
    s1: float | Sequence[float] | np.ndarray,
    m2: Sequence[float] | np.ndarray,
    s2: float | Sequence[float] | np.ndarray,
) -> float:
    """W_2 between N(m1, diag(s1^2)) and N(m2, diag(s2^2)).

    ``s1``, ``s2`` are standard deviations (not variances): scalars for isotropic
    Gaussians or per-coordinate vectors for diagonal covariances. Then
    W_2^2 = |m1 - m2|^2 + sum_i (s1_i - s2_i)^2.
    """
    m1a = np.atleast_1d(np.asarray(m1, dtype=np.float64))
    m2a = np.atleast_1d(np.asarray(m2, dtype=np.float64))
    if m1a.shape != m2a.shape or m1a.ndim != 1:
        raise ValueError(f"means must be 1-D of equal length, got {m1a.shape} and {m2a.shape}")
    s1a = np.broadcast_to(np.asarray(s1, dtype=np.float64), m1a.shape)
    s2a = np.broadcast_to(np.asarray(s2, dtype=np.float64), m1a.shape)
    if np.any(s1a < 0) or np.any(s2a < 0):
        raise ValueError("standard deviations must be non-negative")
    return math.sqrt(float(np.sum((m1a - m2a) ** 2) + np.sum((s1a - s2a) ** 2)))
