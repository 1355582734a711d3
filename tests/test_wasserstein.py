import dataclasses
import math

import numpy as np
import pytest

from sftrl.data.toy import swiss_roll
from sftrl.metrics.wasserstein import (
    SW2Report,
    _emd2_checked,
    exact_w2,
    gaussian_w2_closed_form,
    sliced_w2,
    sw2_report,
)


def _gaussian(n, mean, std, seed):
    rng = np.random.default_rng(seed)
    mean = np.asarray(mean, dtype=np.float64)
    return mean + std * rng.standard_normal((n, mean.shape[0]))


# ---------------------------------------------------------------- closed form


def test_gaussian_closed_form_values():
    assert gaussian_w2_closed_form([0, 0], 1.0, [3, 4], 1.0) == pytest.approx(5.0)
    assert gaussian_w2_closed_form([0, 0], 1.0, [0, 0], 0.5) == pytest.approx(math.sqrt(0.5))
    # diagonal: per-coordinate standard deviations
    assert gaussian_w2_closed_form([1.0], [2.0], [1.0], [0.0]) == pytest.approx(2.0)
    assert gaussian_w2_closed_form([0, 0], [1, 2], [0, 0], [1, 0]) == pytest.approx(2.0)


# ---------------------------------------------------------------- exact W2


def test_exact_w2_gaussians_close_to_closed_form():
    m1, s1, m2, s2 = [0.0, 0.0], 1.0, [3.0, 0.0], 0.5
    x = _gaussian(1500, m1, s1, seed=0)
    y = _gaussian(1500, m2, s2, seed=1)
    true = gaussian_w2_closed_form(m1, s1, m2, s2)  # sqrt(9 + 2 * 0.25) = 3.082
    # The mean shift (3) dominates W2, so the estimate's error is mostly the error of
    # the empirical mean difference along the shift: std sqrt((1 + 0.25) / 1500) =
    # 0.029. The finite-sample bias of the covariance part is an upward ~0.01 here
    # (measured over 20 seeds: mean 3.092, std 0.033). 0.15 is about 4.5 sigma.
    assert exact_w2(x, y, seed=0) == pytest.approx(true, abs=0.15)


@pytest.mark.parametrize("v", [(0.3, -0.4), (2.0, 1.0)])
def test_exact_w2_translation_is_norm_of_shift(v):
    # W2(mu, mu shifted by v) = |v| exactly: W2^2 >= |mean difference|^2 and the
    # identity coupling attains it. No sampling error.
    x = _gaussian(800, [0.0, 0.0], 1.0, seed=2)
    v = np.asarray(v)
    assert exact_w2(x, x + v, seed=0) == pytest.approx(np.linalg.norm(v), abs=1e-6)


def test_exact_w2_self_is_zero():
    x = _gaussian(300, [0.0, 0.0], 1.0, seed=3)
    assert exact_w2(x, x, seed=0) == pytest.approx(0.0, abs=1e-7)


def test_exact_w2_subsample_deterministic_and_sane():
    x = _gaussian(1200, [0.0, 0.0], 1.0, seed=4)
    y = _gaussian(1200, [2.0, 0.0], 1.0, seed=5)
    a = exact_w2(x, y, max_points=400, seed=11)
    assert a == exact_w2(x, y, max_points=400, seed=11)
    assert a != exact_w2(x, y, max_points=400, seed=12)
    # true W2 = 2; the 400-point subsample is noisier and biased upward.
    assert 1.8 < a < 2.5


def test_exact_w2_unequal_sizes():
    x = _gaussian(300, [0.0, 0.0], 1.0, seed=6)
    y = _gaussian(500, [0.0, 0.0], 1.0, seed=7)
    assert 0.0 < exact_w2(x, y, seed=0) < 0.5


@pytest.mark.filterwarnings("ignore:numItermax reached")
def test_emd2_non_convergence_is_detected():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 2))
    y = rng.standard_normal((500, 2)) + 1.0
    a = np.full(500, 1 / 500)
    import ot

    cost = ot.dist(x, y, metric="sqeuclidean")
    with pytest.raises(RuntimeError, match="did not converge"):
        _emd2_checked(a, a, cost, num_itermax=10)
    # the same problem with a proper cap converges
    assert _emd2_checked(a, a, cost, num_itermax=10_000_000) > 0


def test_exact_w2_rejects_dimension_mismatch():
    with pytest.raises(ValueError):
        exact_w2(np.zeros((5, 2)), np.zeros((5, 3)), seed=0)


# ---------------------------------------------------------------- sliced W2


def test_sliced_w2_self_is_zero():
    x = swiss_roll(2000, seed=0)
    assert sliced_w2(x, x, seed=0) == 0.0


def test_sliced_w2_deterministic_for_seed():
    x = swiss_roll(1000, seed=0)
    y = swiss_roll(1000, seed=1)
    assert sliced_w2(x, y, seed=3) == sliced_w2(x, y, seed=3)
    assert sliced_w2(x, y, seed=3) != sliced_w2(x, y, seed=4)


def test_sliced_w2_translation_exact_for_given_projections():
    # For y = x + v every 1-D projection is a pure shift by theta . v, so with POT's own
    # directions SW2 = sqrt(mean_k (theta_k . v)^2) with no sampling error.
    from ot.sliced import get_random_projections

    x = _gaussian(1000, [0.0, 0.0, 0.0], 1.0, seed=0)
    v = np.array([0.2, -0.1, 0.3])
    theta = get_random_projections(3, 100, seed=5)  # (d, n_projections), unit columns
    expected = math.sqrt(np.mean((v @ theta) ** 2))
    assert sliced_w2(x, x + v, n_projections=100, seed=5) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("d", [2, 5])
def test_sliced_w2_translation_closed_form(d):
    # Closed form: SW2(mu, mu + v) = sqrt(E_theta[(theta . v)^2]) = |v| / sqrt(d) for
    # theta uniform on the sphere. The estimate averages K draws of (theta . v)^2,
    # whose relative std is sqrt(2 (d - 1) / (d + 2)); SW2 (the square root) has half
    # that relative error: 0.35 / sqrt(K) for d = 2, 0.38 / sqrt(K) for d = 5.
    x = _gaussian(500, np.zeros(d), 0.1, seed=1)
    v = np.linspace(0.5, -0.3, d)
    closed = np.linalg.norm(v) / math.sqrt(d)
    # K = 2000: relative std 0.85%; 4% is a ~5-sigma band.
    assert sliced_w2(x, x + v, n_projections=2000, seed=0) == pytest.approx(closed, rel=0.04)
    # K = 100 (the paper's setting): relative std ~3.8%; 15% is a ~4-sigma band.
    for seed in range(3):
        assert sliced_w2(x, x + v, n_projections=100, seed=seed) == pytest.approx(closed, rel=0.15)


# ---------------------------------------------------------------- sw2_report


def _swiss(n, seed):
    return swiss_roll(n, seed=seed)


def test_sw2_report_floor_and_determinism():
    rep = sw2_report(_swiss, _swiss, n=2000, draws=4, seed=0)
    assert isinstance(rep, SW2Report)
    assert len(rep.draws) == 4
    assert rep.floor_mean > 0 and rep.floor_std >= 0
    # sample_fn == data_fn: the "generated" score is itself a floor measurement.
    assert rep.mean > 0
    assert rep.min <= rep.mean <= rep.max
    assert rep == sw2_report(_swiss, _swiss, n=2000, draws=4, seed=0)
    assert rep != sw2_report(_swiss, _swiss, n=2000, draws=4, seed=1)


def test_sw2_report_uses_distinct_seeds():
    seen = []

    def record(n, seed):
        seen.append(seed)
        return swiss_roll(n, seed=seed)

    sw2_report(record, record, n=200, draws=3, seed=0)
    # per draw: sample, data, and two floor data draws -- 12 clouds, 12 seeds
    assert len(seen) == 12 and len(set(seen)) == 12


def test_sw2_report_shifted_sampler_exceeds_floor():
    v = np.array([0.06, -0.08], dtype=np.float32)  # |v| = 0.1

    def shifted(n, seed):
        return swiss_roll(n, seed=seed) + v

    rep = sw2_report(shifted, _swiss, n=5000, draws=5, seed=0)
    # Per projection the 1-D W2^2 is (theta . v)^2 + W2^2(data, data') + a cross term
    # of mean ~0, so SW2^2 ~= |v|^2 / 2 + floor^2 in 2-D. Projection noise at K = 100
    # is ~3.5% per draw, ~1.6% over 5 draws: a 10% band.
    expected = math.sqrt(float(v @ v) / 2 + rep.floor_mean**2)
    assert rep.mean == pytest.approx(expected, rel=0.10)
    assert rep.mean > 3 * rep.floor_mean


def test_sw2_report_to_dict_and_frozen():
    rep = sw2_report(_swiss, _swiss, n=300, draws=2, seed=0)
    d = rep.to_dict()
    assert set(d) == {"mean", "std", "min", "max", "draws", "floor_mean", "floor_std", "floor_draws"}
    assert d["draws"] == list(rep.draws)
    assert all(isinstance(x, float) for x in rep.draws)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.mean = 1.0  # type: ignore[misc]


def test_sw2_report_reuses_cached_floors():
    seen = []

    def record(n, seed):
        seen.append(seed)
        return swiss_roll(n, seed=seed)

    first = sw2_report(record, record, n=300, draws=3, seed=0)
    seen.clear()
    again = sw2_report(record, record, n=300, draws=3, seed=0, floors=first.floor_draws)
    assert again == first
    assert len(seen) == 6  # only the sample and data clouds: the floor clouds are not drawn again
    with pytest.raises(ValueError, match="2 cached floors for 3 draws"):
        sw2_report(record, record, n=300, draws=3, seed=0, floors=first.floor_draws[:2])


def test_sw2_report_single_draw_std_zero():
    rep = sw2_report(_swiss, _swiss, n=300, draws=1, seed=0)
    assert rep.std == 0.0 and rep.floor_std == 0.0


def test_the_spread_ratio_sees_an_under_dispersed_sampler_that_sw2_only_ranks():
    from sftrl.evaluation import spread_ratio

    rng = np.random.default_rng(0)
    real = 0.5 + 0.01 * rng.standard_normal((10_000, 2))  # Appendix A's cluster
    narrow = 0.5 + 0.006 * rng.standard_normal((10_000, 2))  # the Gaussian T' = 2 plateau: 0.6 of the spread
    assert spread_ratio(narrow, real) == pytest.approx(0.6, rel=0.03)
    assert spread_ratio(0.5 + 0.01 * rng.standard_normal((10_000, 2)), real) == pytest.approx(1.0, rel=0.03)
    assert spread_ratio(real, np.full_like(real, 0.5)) > 1e6  # a constant data set divides by the floor, not by 0
