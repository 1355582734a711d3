import socket

import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from sftrl.data.images import load_digits_images
from sftrl.metrics import fid as fid_module
from sftrl.metrics.fid import (
    DigitsTrainConfig,
    FeatureExtractor,
    FIDResult,
    InceptionExtractor,
    digits_extractor,
    extract_features,
    fid_kid,
    inception_extractor_if_available,
    train_digits_extractor,
)


@pytest.fixture(scope="module")
def extractor_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("extractors")


@pytest.fixture(scope="module")
def extractor(extractor_cache):
    return digits_extractor(extractor_cache)  # trained once per session (a few seconds)


@pytest.fixture(scope="module")
def digits():
    return torch.from_numpy(load_digits_images())  # (1797, 1, 8, 8)


# KID over 10 subsets of 300 keeps each call well under a second; the defaults (100 x 1000, the
# standard setting) cost ~30x more and test nothing extra.
KID = {"kid_subsets": 10, "kid_subset_size": 300}


def _noisy(x, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


# ------------------------------------------------------------------------ digits extractor


def test_digits_extractor_accuracy_and_name(extractor):
    assert extractor.heldout_accuracy >= 0.95
    assert isinstance(extractor, FeatureExtractor)
    assert "digits-cnn-v1" in extractor.name and "not Inception" in extractor.name
    assert extractor.num_features == 64
    assert not extractor.training


def test_digits_extractor_heldout_accuracy_recomputed(extractor):
    x_train, x_test, y_train, y_test = fid_module._digits_split(DigitsTrainConfig())
    assert len(x_test) == 360 and len(x_train) == 1437
    with torch.no_grad():
        pred = extractor.logits(torch.from_numpy(x_test)).argmax(1).numpy()
    assert (pred == y_test).mean() == pytest.approx(extractor.heldout_accuracy)


def test_digits_extractor_cache_round_trip(extractor, extractor_cache, monkeypatch):
    files = list(extractor_cache.glob("digits-cnn-v1-8px-*.pt"))
    assert len(files) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached extractor should have been loaded, not retrained")

    monkeypatch.setattr(fid_module, "train_digits_extractor", no_training)
    loaded = digits_extractor(extractor_cache)
    assert loaded is not extractor
    for (k1, v1), (k2, v2) in zip(extractor.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert loaded.heldout_accuracy == extractor.heldout_accuracy
    assert loaded.name == extractor.name


def test_cache_key_depends_on_recipe(tmp_path):
    file_a, _ = fid_module._cache_file(tmp_path, DigitsTrainConfig())
    file_b, _ = fid_module._cache_file(tmp_path, DigitsTrainConfig(epochs=31))
    file_c, _ = fid_module._cache_file(tmp_path, DigitsTrainConfig(image_size=16))
    assert len({file_a, file_b, file_c}) == 3
    assert file_c.name.startswith("digits-cnn-v1-16px-")


def test_corrupt_cache_is_retrained(tmp_path):
    cfg = DigitsTrainConfig(epochs=1)
    file, _ = fid_module._cache_file(tmp_path, cfg)
    file.write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="unreadable extractor cache"):
        model = digits_extractor(tmp_path, epochs=1)
    assert torch.load(file, weights_only=True)["heldout_accuracy"] == model.heldout_accuracy


def test_training_is_deterministic_and_leaves_global_state():
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = train_digits_extractor(DigitsTrainConfig(epochs=1))
    after = torch.rand(3)
    b = train_digits_extractor(DigitsTrainConfig(epochs=1))
    assert torch.equal(before, after)  # the global RNG is untouched
    assert torch.get_num_threads() == threads
    for v1, v2 in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(v1, v2)
    c = train_digits_extractor(DigitsTrainConfig(epochs=1, seed=1))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_extractor_accepts_uint8_and_float(extractor, digits):
    x = digits[:10]
    as_uint8 = ((x + 1) * 127.5).round().to(torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(extractor(as_uint8), extractor(as_uint8.float() / 127.5 - 1))
        assert extractor(x).shape == (10, 64)
    with pytest.raises(ValueError, match="expects"):
        extractor(torch.zeros(2, 1, 16, 16))


# --------------------------------------------------------------------------------- FID / KID


def test_fid_of_a_set_with_itself_is_zero(extractor, digits):
    same = fid_kid(digits, digits, extractor, **KID)
    shifted = fid_kid(digits, (digits + 0.3).clamp(-1, 1), extractor, **KID)
    assert shifted.fid > 0
    assert abs(same.fid) < 1e-3 * shifted.fid
    # KID's unbiased MMD^2 of a set with itself scatters around 0 over random subsets
    assert abs(same.kid_mean) < 0.05 * shifted.kid_mean


def test_fid_and_kid_grow_with_noise(extractor, digits):
    results = [fid_kid(digits, _noisy(digits, s), extractor, **KID) for s in (0.1, 0.3, 0.6)]
    fids = [r.fid for r in results]
    kids = [r.kid_mean for r in results]
    assert fids[0] < fids[1] < fids[2], fids
    assert kids[0] < kids[1] < kids[2], kids
    assert kids[0] > 0


def test_fid_between_halves_is_small(extractor, digits):
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(digits), generator=g)
    halves = fid_kid(digits[perm[:900]], digits[perm[900:]], extractor, **KID)
    noisy = fid_kid(digits[perm[:900]], _noisy(digits[perm[900:]], 0.3), extractor, **KID)
    # two finite samples of one distribution: a positive bias, well below a visible corruption
    assert 0 < halves.fid < 0.5 * noisy.fid


def test_result_names_the_extractor(extractor, digits):
    result = fid_kid(digits[:300], digits[300:500].numpy(), extractor, kid_subsets=5)
    assert isinstance(result, FIDResult)
    assert result.extractor == extractor.name
    assert (result.num_real, result.num_fake, result.kid_subset_size) == (300, 200, 200)
    d = result.to_dict()
    assert set(d) == {
        "fid",
        "kid_mean",
        "kid_std",
        "extractor",
        "num_real",
        "num_fake",
        "kid_subset_size",
    }
    assert "not Inception" in d["extractor"]
    assert all(isinstance(d[k], float) for k in ("fid", "kid_mean", "kid_std"))


def test_kid_reproducible_and_rng_untouched(extractor, digits):
    fake = _noisy(digits, 0.2)
    torch.manual_seed(7)
    before = torch.rand(2)
    torch.manual_seed(7)
    r1 = fid_kid(digits, fake, extractor, kid_subset_size=100, kid_subsets=20, seed=3)
    after = torch.rand(2)
    r2 = fid_kid(digits, fake, extractor, kid_subset_size=100, kid_subsets=20, seed=3)
    r3 = fid_kid(digits, fake, extractor, kid_subset_size=100, kid_subsets=20, seed=4)
    assert torch.equal(before, after)
    assert r1 == r2
    assert r1.kid_mean != r3.kid_mean and r1.fid == r3.fid


def test_matches_torchmetrics_with_the_module_as_feature(extractor, digits):
    """The extractor plugs straight into torchmetrics too (it is handed the float images)."""
    fake = _noisy(digits, 0.3)
    metric = FrechetInceptionDistance(feature=extractor, normalize=True)
    with torch.no_grad():
        metric.update(digits, real=True)
        metric.update(fake, real=False)
    direct = float(metric.compute())
    assert fid_kid(digits, fake, extractor, kid_subsets=1).fid == pytest.approx(direct, rel=1e-4)


def test_fid_kid_input_errors(extractor, digits):
    with pytest.raises(ValueError, match="differ in shape"):
        fid_kid(digits, torch.zeros(10, 1, 16, 16), extractor)
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid(digits, digits[:1], extractor)
    with pytest.raises(ValueError, match="must be"):
        fid_kid(digits[:, 0], digits[:, 0], extractor)
    with pytest.raises(TypeError, match="name"):
        fid_kid(digits, digits, nn.Flatten())


def test_extract_features_batches_and_restores_mode(extractor, digits):
    extractor.train()
    try:
        f1 = extract_features(digits[:50], extractor, batch_size=7)
        assert extractor.training
    finally:
        extractor.eval()
    f2 = extract_features(digits[:50], extractor, batch_size=50)
    assert f1.shape == (50, 64) and f1.dtype == torch.float64
    torch.testing.assert_close(f1, f2, rtol=1e-4, atol=1e-5)  # float32 convs vary by batch


# --------------------------------------------------------------------------------- Inception


class _NoNetwork:
    def __enter__(self):
        self._connect = socket.socket.connect

        def refuse(*args, **kwargs):
            raise AssertionError("network access attempted")

        socket.socket.connect = refuse
        return self

    def __exit__(self, *exc):
        socket.socket.connect = self._connect


def test_inception_needs_local_weights_and_never_downloads(tmp_path, monkeypatch):
    """Missing weights give None, not a download; a file in the cache (or torch-fidelity's)
    gives the FID network."""
    from sftrl.metrics.inception import INCEPTION_WEIGHTS_FILE, random_fid_inception_state

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "weights"
    with _NoNetwork():
        assert inception_extractor_if_available(weights_dir=cache) is None
        assert inception_extractor_if_available(tmp_path / "missing.pth") is None
    assert fid_module.inception_weights_paths(cache) == [
        cache / INCEPTION_WEIGHTS_FILE, tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE]
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(random_fid_inception_state(1), hub / INCEPTION_WEIGHTS_FILE)  # torch-fidelity's copy counts
    with _NoNetwork():
        extractor = inception_extractor_if_available(weights_dir=cache)
    assert extractor is not None and extractor.num_features == 2048 and extractor.name.startswith("inception-v3")


def test_inception_wrapper_feeds_uint8_rgb():
    seen = {}

    class Stub(nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.float().mean(dim=(2, 3)).repeat(1, 2)  # (B, 6)

    wrapper = InceptionExtractor(Stub(), num_features=6)
    assert "standard FID" in wrapper.name
    out = wrapper(torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(1, 1, 2, 2))
    x = seen["x"]
    assert x.dtype == torch.uint8 and x.shape == (1, 3, 2, 2)
    assert x[0, 0].flatten().tolist() == [0, 128, 255, 255]  # 0 -> 127.5 rounds to even: 128
    assert out.shape == (1, 6)
