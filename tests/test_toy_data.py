import numpy as np
import pytest

from sftrl.data.toy import TOY_DATASETS, gaussian_cluster, make_toy, swiss_roll, two_moons


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_shape_dtype(name):
    x = make_toy(name, 1234, seed=0)
    assert x.shape == (1234, 2)
    assert x.dtype == np.float32
    assert np.all(np.isfinite(x))


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_deterministic_for_fixed_seed(name):
    np.testing.assert_array_equal(make_toy(name, 500, seed=7), make_toy(name, 500, seed=7))


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_different_seeds_differ(name):
    assert not np.array_equal(make_toy(name, 500, seed=1), make_toy(name, 500, seed=2))


def test_registry_functions():
    assert TOY_DATASETS == {
        "swissroll": swiss_roll,
        "moons": two_moons,
        "gaussian": gaussian_cluster,
    }


def test_swiss_roll_matches_reference_construction():
    from sklearn.datasets import make_swiss_roll

    ref, _ = make_swiss_roll(300, noise=0.05, random_state=3)
    np.testing.assert_allclose(swiss_roll(300, seed=3), (ref[:, [0, 2]] / 20).astype(np.float32))


def test_swiss_roll_range():
    x = swiss_roll(10_000, seed=0)
    # t in [1.5 pi, 4.5 pi]: x0 = t cos t / 20 in [-0.47, 0.63], x1 = t sin t / 20 in
    # [-0.55, 0.71]; the noise (0.05 / 20) is negligible.
    assert x.min() >= -0.6 and x.max() <= 0.75
    assert x[:, 0].min() < -0.4 and x[:, 0].max() > 0.55
    assert x[:, 1].min() < -0.5 and x[:, 1].max() > 0.65


def test_moons_range():
    x = two_moons(10_000, seed=0)
    # make_moons spans x0 in [-1, 2], x1 in [-0.5, 1]; halved, plus noise std 0.025.
    assert -0.65 < x[:, 0].min() < -0.4 and 0.9 < x[:, 0].max() < 1.15
    assert -0.4 < x[:, 1].min() < -0.15 and 0.4 < x[:, 1].max() < 0.65


def test_moons_matches_reference_construction():
    from sklearn.datasets import make_moons

    ref, _ = make_moons(300, noise=0.05, random_state=3)
    np.testing.assert_allclose(two_moons(300, seed=3), (ref / 2).astype(np.float32))


def test_gaussian_cluster_moments():
    n = 10_000
    x = gaussian_cluster(n, seed=0).astype(np.float64)
    # mean has std 0.01 / sqrt(n) = 1e-4 per coordinate: 5e-4 is a 5-sigma band.
    np.testing.assert_allclose(x.mean(axis=0), [0.5, 0.5], atol=5e-4)
    # sample std has relative std ~ 1 / sqrt(2n) = 0.7%: 5% is far outside it.
    np.testing.assert_allclose(x.std(axis=0), [0.01, 0.01], rtol=0.05)


def test_gaussian_cluster_custom_center_std():
    x = gaussian_cluster(5000, seed=1, center=(-1.0, 2.0), std=0.5).astype(np.float64)
    np.testing.assert_allclose(x.mean(axis=0), [-1.0, 2.0], atol=0.05)
    np.testing.assert_allclose(x.std(axis=0), [0.5, 0.5], rtol=0.05)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        make_toy("checkerboard", 10, seed=0)
    msg = str(err.value)
    assert "checkerboard" in msg
    for name in TOY_DATASETS:
        assert name in msg
