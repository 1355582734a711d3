"""The DDPM U-Net: exact state_dict layout of the DDIM releases, forward pass, checkpoint loading.

The released checkpoints are not downloaded; the fixtures list their every key and shape, and the
loader is exercised on tiny U-Nets written in both release formats.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from sftrl.models.unet import (
    AttnBlock,
    CheckpointMismatchError,
    UNet,
    load_ddim_checkpoint,
    timestep_embedding,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_NAMES = ("ddim_unet_cifar10_state_dict.json", "ddim_unet_celeba_state_dict.json")


def _fixtures_dir() -> Path:
    # Copies of the shared fixtures ship with the tests, so this check never depends on a
    # neighbouring checkout.
    return Path(__file__).resolve().parent / "fixtures"


TINY = dict(
    ch=32,
    out_ch=3,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    dropout=0.1,
    in_channels=3,
    resolution=16,
)


def tiny_unet(seed: int) -> UNet:
    torch.manual_seed(seed)
    return UNet(**TINY).eval()


def _prefixed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"module.{k}": v.clone() for k, v in sd.items()}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == sd.keys()
    for k in sd:
        assert torch.equal(got[k], sd[k]), k


# --- 1. exact layout of the released checkpoints -------------------------------------------------


@pytest.mark.parametrize("fixture_name", FIXTURE_NAMES)
def test_state_dict_matches_released_checkpoint(fixture_name: str) -> None:
    fixtures = _fixtures_dir()
    fixture = json.loads((fixtures / fixture_name).read_text())
    entries = [(k, tuple(shape)) for k, shape in fixture["entries"]]
    assert len(entries) == fixture["num_entries"]

    # Shapes only: the meta device allocates nothing, so even CelebA's 78.7M parameters are free.
    with torch.device("meta"):
        model = UNet.from_fixture_config(fixture)
    assert model.resolution == fixture["data_image_size"]
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]

    assert len(ours) == len(entries) == fixture["num_entries"]
    assert {k for k, _ in ours} == {k for k, _ in entries}
    expected_shapes = dict(entries)
    wrong = [(k, s, expected_shapes[k]) for k, s in ours if s != expected_shapes[k]]
    assert not wrong, wrong
    # Also the same order as the release (what torch.save of the original module writes).
    assert ours == entries
    assert sum(p.numel() for p in model.parameters()) == fixture["num_params"]
    assert sum(math.prod(s) for _, s in entries) == fixture["num_params"]


def test_positional_constructor_matches_documented_signature() -> None:
    with torch.device("meta"):
        model = UNet(128, 3, (1, 2, 2, 2), 2, (16,), 0.1, 3, 32, True)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307


# --- 2. forward pass -----------------------------------------------------------------------------


def test_forward_shape_and_timestep_dependence() -> None:
    model = tiny_unet(0)  # eval(): dropout off, so output differences come from t alone
    x = torch.randn(2, 3, 16, 16)
    t_a = torch.tensor([616.7, 3.25])
    t_b = torch.tensor([616.2, 3.75])
    with torch.no_grad():
        out_a = model(x, t_a)
        out_a2 = model(x, t_a)
        out_b = model(x, t_b)
    assert out_a.shape == x.shape
    assert torch.equal(out_a, out_a2)
    # A half-step change of a fractional t changes every sample's prediction.
    per_sample_diff = (out_a - out_b).abs().flatten(1).amax(dim=1)
    assert (per_sample_diff > 1e-4).all(), per_sample_diff
    # Fractional t is not rounded: 616.7 differs from 617.
    with torch.no_grad():
        out_int = model(x, torch.tensor([617.0, 3.0]))
    assert not torch.allclose(out_a, out_int)


def test_forward_without_resampling_convs() -> None:
    torch.manual_seed(1)
    model = UNet(**{**TINY, "resamp_with_conv": False}).eval()
    assert not any("sample" in k for k in model.state_dict())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([10.5]))
    assert out.shape == (1, 3, 16, 16)


def test_forward_rejects_wrong_shapes() -> None:
    model = tiny_unet(0)
    with pytest.raises(ValueError, match="16x16"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="t of shape"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0, 3.0]))


def test_timestep_embedding_matches_closed_form() -> None:
    t = torch.tensor([0.0, 1.0, 616.7, 999.0])
    dim = 8
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim)
    half = dim // 2
    for i, ti in enumerate(t.tolist()):
        for k in range(half):
            freq = 10000.0 ** (-k / (half - 1))
            assert emb[i, k].item() == pytest.approx(math.sin(ti * freq), abs=1e-4)
            assert emb[i, half + k].item() == pytest.approx(math.cos(ti * freq), abs=1e-4)
    odd = timestep_embedding(t, 9)
    assert odd.shape == (4, 9)
    assert torch.equal(odd[:, :8], emb)
    assert torch.equal(odd[:, 8], torch.zeros(4))


# --- 3. both release formats load ----------------------------------------------------------------


def test_load_plain_state_dict(tmp_path: Path) -> None:
    source = tiny_unet(1)
    path = tmp_path / "ema_cifar10.pth"
    torch.save(source.state_dict(), path)

    target = tiny_unet(2)
    load_ddim_checkpoint(path, target)
    _assert_same_weights(target, source.state_dict())


def test_load_training_list_takes_ema_weights(tmp_path: Path) -> None:
    trained, ema = tiny_unet(1), tiny_unet(3)
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-4)
    loss = trained(torch.randn(1, 3, 16, 16), torch.tensor([5.0])).square().mean()
    loss.backward()
    optimizer.step()  # a real optimizer state (tensors, ints, float lists) in slot 1
    checkpoint = [
        _prefixed(trained.state_dict()),
        optimizer.state_dict(),
        7,  # epoch
        1234,  # step
        _prefixed(ema.state_dict()),
    ]
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)

    target = tiny_unet(2)
    load_ddim_checkpoint(str(path), target)
    _assert_same_weights(target, ema.state_dict())
    assert not torch.equal(target.conv_in.weight, trained.conv_in.weight)


def test_load_list_without_ema_is_refused(tmp_path: Path) -> None:
    model = tiny_unet(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "no_ema.pth"
    torch.save([model.state_dict(), optimizer.state_dict(), 1, 2], path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_ddim_checkpoint(path, tiny_unet(2))


# --- 4. failures are loud and load nothing -------------------------------------------------------


def test_mismatched_checkpoint_lists_everything_and_loads_nothing(tmp_path: Path) -> None:
    sd = tiny_unet(1).state_dict()
    del sd["mid.attn_1.q.bias"]
    sd["mid.attn_1.extra.weight"] = torch.zeros(3)
    sd["conv_in.weight"] = torch.zeros(32, 4, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(_prefixed(sd), path)

    target = tiny_unet(2)
    before = _snapshot(target)
    with pytest.raises(CheckpointMismatchError) as info:
        load_ddim_checkpoint(path, target)
    err = info.value
    message = str(err)
    assert isinstance(err, ValueError)
    assert str(path) in message
    assert "mid.attn_1.q.bias" in message
    assert "mid.attn_1.extra.weight" in message
    assert "conv_in.weight: expected [32, 3, 3, 3] vs found [32, 4, 3, 3]" in message
    assert err.missing == ["mid.attn_1.q.bias"]
    assert err.unexpected == ["mid.attn_1.extra.weight"]
    assert err.mismatched == [("conv_in.weight", (32, 3, 3, 3), (32, 4, 3, 3))]
    # The matching entries were not copied either.
    _assert_same_weights(target, before)


def test_mismatch_message_is_truncated(tmp_path: Path) -> None:
    sd = tiny_unet(1).state_dict()
    n_keys = len(sd)
    path = tmp_path / "empty.pth"
    torch.save({f"junk.{i}": torch.zeros(1) for i in range(25)}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_ddim_checkpoint(path, tiny_unet(2))
    message = str(info.value)
    assert f"{n_keys} missing keys" in message
    assert f"... and {n_keys - 20} more" in message
    assert "25 unexpected keys" in message and "... and 5 more" in message
    assert "junk.19" in message and "junk.20" not in message
    assert len(info.value.missing) == n_keys


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "model.ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_ddim_checkpoint(path, tiny_unet(0))


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n" * 8])
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    model = tiny_unet(0)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="not a PyTorch checkpoint") as info:
        load_ddim_checkpoint(path, model)
    assert str(path) in str(info.value)
    assert not isinstance(info.value, CheckpointMismatchError)
    _assert_same_weights(model, before)


# --- 5. fused attention == the written-out formula -----------------------------------------------


def test_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    block = AttnBlock(64).eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        out = block(x)

        b, c, h, w = x.shape
        hn = block.norm(x)
        q = block.q(hn).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        k = block.k(hn).reshape(b, c, h * w)  # (B, C, HW)
        v = block.v(hn).reshape(b, c, h * w)  # (B, C, HW)
        weights = torch.softmax(torch.bmm(q, k) / math.sqrt(c), dim=2)  # (B, HW_q, HW_k)
        attended = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        expected = x + block.proj_out(attended)

    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
