"""FIDInceptionV3 against torch-fidelity's FeatureExtractorInceptionV3, without either download.

``fixtures/inception_fid_reference.pt`` was written by ``fixtures/make_inception_fixture.py`` with
torch-fidelity 0.4.0's own class: its state-dict keys and shapes, the pool3 features of fixed
uint8 images under the seeded weights of ``random_fid_inception_state``, and its TF1 resize on
three cases. Here the same weights go through a file and ``load_fid_inception``, so a wrong layer,
pool, epsilon, normalisation or resize shows up as a feature mismatch (each of those changes the
features by 40x to 10^4x the tolerance).
"""

from pathlib import Path

import pytest
import torch

from conftest import assert_close
from sftrl.metrics.inception import (
    INCEPTION_SHA256_PREFIX,
    INCEPTION_URL,
    INCEPTION_WEIGHTS_FILE,
    NUM_BATCHES_TRACKED,
    FIDInceptionV3,
    load_fid_inception,
    random_fid_inception_state,
    resize_bilinear_tf1,
    state_sha256,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "inception_fid_reference.pt"
# Our features equal torch-fidelity's bit for bit on the machine that made the fixture; the
# tolerance leaves room for other CPUs' convolution kernels (features are O(1)-O(80)).
RTOL = ATOL = 1e-4


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def random_state(reference) -> dict[str, torch.Tensor]:
    return random_fid_inception_state(reference["weights_seed"])


@pytest.fixture(scope="module")
def released_layout_file(random_state, tmp_path_factory) -> Path:
    """The seeded weights saved as the released file is: a plain dict, no BatchNorm counters."""
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save({k: v for k, v in random_state.items() if not k.endswith(NUM_BATCHES_TRACKED)}, path)
    return path


@pytest.fixture(scope="module")
def model(released_layout_file) -> FIDInceptionV3:
    return load_fid_inception(released_layout_file)


def test_state_dict_layout_is_torch_fidelitys(reference, random_state):
    with torch.device("meta"):
        ours = [(k, list(v.shape)) for k, v in FIDInceptionV3().state_dict().items()]
    theirs = [(k, list(shape)) for k, shape in reference["entries"]]
    assert len(theirs) == 566  # 94 conv + 94 x 5 batch-norm entries + fc weight and bias
    assert ours == theirs  # same keys, shapes and order
    assert sorted(random_state) == sorted(k for k, _ in theirs)


def test_seeded_weights_are_the_fixtures(reference, random_state):
    assert state_sha256(random_state) == reference["weights_sha256"]
    running_vars = [v for k, v in random_state.items() if k.endswith("running_var")]
    assert min(float(v.min()) for v in running_vars) >= 0.5


def test_features_match_torch_fidelity(reference, model):
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    for group, images in reference["images"].items():
        with torch.inference_mode():
            features = model(images)
        expected = reference["features"][group]
        assert features.dtype == torch.float32 and features.shape == (images.shape[0], 2048), group
        assert_close(features, expected, rtol=RTOL, atol=ATOL)
    # The 4 CIFAR-sized images are told apart by far more than the tolerance.
    spread = reference["features"]["32x32"] - reference["features"]["32x32"][0]
    assert float(spread.abs().amax(dim=1)[1:].min()) > 100 * ATOL


def test_batch_norm_stays_frozen_in_train_mode(reference, model):
    images = reference["images"]["32x32"][:1]
    model.train()
    try:
        with torch.inference_mode():
            features = model(images)
    finally:
        model.eval()
    assert_close(features, reference["features"]["32x32"][:1], rtol=RTOL, atol=ATOL)


def test_loads_a_state_dict_with_batch_norm_counters(random_state, tmp_path):
    path = tmp_path / "with_counters.pth"
    torch.save(random_state, path)
    loaded = load_fid_inception(path).state_dict()
    assert loaded.keys() == random_state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in random_state.items())


@pytest.mark.parametrize("case", ["32_to_299", "7x5_to_23x31", "40x33_to_9x13"])
def test_resize_matches_torch_fidelity(reference, case):
    pinned = reference["resize"][case]
    out = resize_bilinear_tf1(pinned["input"], tuple(pinned["size"]))
    assert_close(out, pinned["output"], atol=ATOL)


def test_resize_is_tf1s_corner_aligned_sampling():
    # Width 2 -> 4 samples the source at 0, 0.5, 1, 1.5 (no half-pixel shift), clamped at the edge;
    # F.interpolate(align_corners=False) would give 0, 2.5, 7.5, 10.
    x = torch.tensor([[[[0.0, 10.0]]]])  # (1, 1, 1, 2)
    assert resize_bilinear_tf1(x, (1, 4)).tolist() == [[[[0.0, 5.0, 10.0, 10.0]]]]
    # Downsampling by 2 takes every other pixel, without averaging.
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(resize_bilinear_tf1(x, (2, 2)), x[:, :, ::2, ::2])
    assert torch.equal(resize_bilinear_tf1(x, (4, 4)), x)


def test_wrong_input_is_refused(model):
    with pytest.raises(ValueError, match="uint8 images"):
        model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, 1, 8, 8\)"):
        model(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="float"):
        resize_bilinear_tf1(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), (3, 3))


def test_mismatched_keys_name_the_file_and_the_keys(random_state, tmp_path):
    state = {k: v for k, v in random_state.items() if not k.endswith(NUM_BATCHES_TRACKED)}
    state["Mixed_5b.branch1x1.conv.weights"] = state.pop("Mixed_5b.branch1x1.conv.weight")
    state["fc.weight"] = state["fc.weight"][:1000]
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_fid_inception(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "1 missing (Mixed_5b.branch1x1.conv.weight)" in message
    assert "1 unexpected (Mixed_5b.branch1x1.conv.weights)" in message
    assert "1 mis-shaped (fc.weight [1000, 2048] (expected [1008, 2048]))" in message


def test_a_few_keys_only_are_named(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(
        ValueError, match=r"472 missing \(Conv2d_1a_3x3\.conv\.weight, .* and 469 more\)"
    ):
        load_fid_inception(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"this is a text file, not weights\n", "is not a PyTorch state dict"),
        (None, "holds a list that is not a state dict"),
    ],
)
def test_a_file_that_is_not_a_state_dict_is_named(tmp_path, content, match):
    path = tmp_path / "not_weights.pth"
    if content is None:
        torch.save([torch.zeros(1)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        load_fid_inception(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_wrong_hash(tmp_path):
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        load_fid_inception(tmp_path / "absent.pth")
    path = tmp_path / "other.pth"
    path.write_bytes(b"not the released file")
    with pytest.raises(ValueError, match="does not start with 6726825d"):
        load_fid_inception(path, expected_sha256_prefix=INCEPTION_SHA256_PREFIX)
    assert INCEPTION_URL.endswith("/" + INCEPTION_WEIGHTS_FILE)
