"""Images at scale: uint8 stores, the decode cache built once, flips, CelebA's train split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_image_e2e import write_celeba_jpegs

from conftest import REPO
from sftrl.config import load
from sftrl.data import flips, load_real_data
from sftrl.data.cache import cache_file, cached_images
from sftrl.data.images import DataError, celeba_plan
from sftrl.data.store import ImageStore


def test_a_store_converts_only_the_batch_asked_for_and_flips_by_its_generator():
    images = np.arange(4 * 1 * 2 * 3, dtype=np.uint8).reshape(4, 1, 2, 3) * 10
    plain = ImageStore(images)
    x = plain.batch(torch.tensor([2, 0]))
    assert x.dtype == torch.float32 and x.shape == (2, 1, 2, 3)
    assert torch.equal(x[0], torch.from_numpy(images[2]).float() / 127.5 - 1)  # v / 127.5 - 1, in the order asked
    assert torch.equal(x[1], torch.from_numpy(images[0]).float() / 127.5 - 1)
    flipping = ImageStore(images, flip=True)
    a = flipping.batch(torch.arange(4), generator=torch.Generator().manual_seed(1))
    b = flipping.batch(torch.arange(4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # the coins follow the generator
    unflipped = plain.batch(torch.arange(4))
    flipped = [bool(torch.equal(a[i], unflipped[i].flip(-1))) for i in range(4)]
    kept = [bool(torch.equal(a[i], unflipped[i])) for i in range(4)]
    heads = (torch.rand(4, generator=torch.Generator().manual_seed(1)) < 0.5).tolist()
    assert flipped == heads and kept == [not h for h in heads] and any(heads) and not all(heads)
    chunks = list(flipping.chunks(3))  # the FID reference: in order, never flipped
    assert [len(c) for c in chunks] == [3, 1] and torch.equal(torch.cat(chunks), unflipped)
    with pytest.raises(ValueError, match="uint8"):
        ImageStore(images.astype(np.float32))


def test_the_decode_cache_is_built_once_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    folder = write_celeba_jpegs(tmp_path / "celeba", 6)
    plan = celeba_plan(folder, 16)
    decoded = []
    real_decode = plan.decode
    counting = type(plan)(plan.name, plan.files, lambda f: decoded.append(f) or real_decode(f), plan.shape,
                          plan.recipe)
    first = cached_images(counting, tmp_path / "cache", progress=False)
    assert isinstance(first, np.memmap) and first.dtype == np.uint8 and first.shape == (6, 3, 16, 16)
    assert len(decoded) == 6
    again = cached_images(counting, tmp_path / "cache", progress=False)
    assert len(decoded) == 6 and np.array_equal(first, again)  # mapped, not decoded again
    np.testing.assert_array_equal(first, plan.decode_all())
    before = cache_file(plan, tmp_path / "cache")
    plan.files[0].write_bytes(plan.files[1].read_bytes())  # a changed file: another cache
    assert cache_file(celeba_plan(folder, 16), tmp_path / "cache") != before


def test_a_failed_decode_caches_nothing(tmp_path):
    folder = write_celeba_jpegs(tmp_path / "celeba", 3)
    (folder / "000002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot decode image"):
        cached_images(celeba_plan(folder, 16), tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("*.npy")) and not list((tmp_path / "cache").glob(".*.tmp"))


def test_celeba_takes_the_official_train_split(tmp_path, capsys):
    folder = write_celeba_jpegs(tmp_path / "celeba", 5)
    plan = celeba_plan(folder, 16, split="train")  # no partition file: the first 162,770 by name (all 5 here)
    assert len(plan.files) == 5 and "no list_eval_partition.txt beside the images" in plan.note
    (folder.parent / "list_eval_partition.txt").write_text(
        "000001.jpg 0\n000002.jpg 1\n000003.jpg 0\n000004.jpg 2\n000005.jpg 0\n")
    plan = celeba_plan(folder, 16, split="train")
    assert [f.name for f in plan.files] == ["000001.jpg", "000003.jpg", "000005.jpg"]
    assert "from " in plan.note and plan.note.endswith("list_eval_partition.txt")
    assert len(celeba_plan(folder, 16, split="all").files) == 5


def test_runs_see_images_as_a_uint8_store_that_flips_where_the_authors_flip(tmp_path, capsys):
    folder = write_celeba_jpegs(tmp_path / "celeba", 4)
    cfg = load(REPO / "configs" / "celeba.yaml", [f"data.path={folder}", "data.image_size=16",
                                                 f"pretrain.cache_dir={tmp_path / 'pretrained'}"])
    store = load_real_data(cfg, progress=False)
    assert isinstance(store, ImageStore) and store.flip and store.shape == (4, 3, 16, 16)
    assert isinstance(store.images, np.memmap)  # mapped from the decode cache beside pretrain.cache_dir
    assert list((tmp_path / "data").glob("celeba-4x3x16x16-*.u8.npy"))
    assert "note: CelebA train split" in capsys.readouterr().err
    assert flips(load(REPO / "configs" / "mnist.yaml", [])) is False
    assert flips(load(REPO / "configs" / "celeba.yaml", ["data.flip=false"])) is False
    assert flips(load(REPO / "configs" / "cifar10.yaml", [])) is True
