"""What an image run gives a user: standard FID/KID from an Inception weights file, a sample grid at
each evaluation, ``sftrl sample`` as npz or a folder of PNGs, and ``sftrl weights inception``.

The Inception here is the FID network's architecture with seeded random weights written to a
file (``random_fid_inception_state``): the whole path runs, offline, and its numbers are not
published FIDs. One tiny CIFAR-10 run (module fixture) serves every test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_image_e2e import TINY, assert_pictures_at_each_evaluation, tiny_unet, write_cifar_batches

from conftest import REPO, run_cli
from sftrl.metrics.inception import INCEPTION_WEIGHTS_FILE, random_fid_inception_state


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save(random_fid_inception_state(0), path)
    return path


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, inception_file):
    tmp = tmp_path_factory.mktemp("image-run")
    data = write_cifar_batches(tmp / "cifar")
    checkpoint = tmp / "ddpm.pt"
    torch.save(tiny_unet(3, 32).state_dict(), checkpoint)
    run_dir = tmp / "run"
    result = run_cli(
        ["sftrl.run", "configs/cifar10.yaml", *TINY, f"pretrain.cache_dir={tmp / 'cache'}", f"data.path={data}",
         f"model.checkpoint={checkpoint}", f"trainer.fid_weights={inception_file}", "--run-dir", str(run_dir),
         "--no-progress"],
        env={"TORCH_HOME": str(tmp / "torch-home")},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_an_image_run_reports_inception_fid_and_draws_a_grid_at_each_evaluation(image_run):
    run_dir, result = image_run
    assert "FID/KID skipped" not in result.stderr
    report = json.loads((run_dir / "report.json").read_text())
    rows = report["evaluations"]
    assert [r["sampler"] for r in rows] == ["initial (pretrained)", "fine-tuned"]
    for row in rows:
        assert row["extractor"].startswith("inception-v3-compat") and np.isfinite(row["fid"]) and row["fid"] > 0
        assert (row["num_real"], row["num_fake"]) == (20, 8)  # 5 CIFAR batches of 4; trainer.eval_samples
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/fid" in line]
    assert [line["iteration"] for line in evals] == [0, 3] and not any("eval/pictures" in line for line in lines)
    assert_pictures_at_each_evaluation(run_dir, [0, 3])


def test_a_missing_fid_weights_file_is_one_line_before_anything_runs(tmp_path):
    data = write_cifar_batches(tmp_path / "cifar")
    checkpoint = tmp_path / "ddpm.pt"
    torch.save(tiny_unet(3, 32).state_dict(), checkpoint)
    result = run_cli(
        ["sftrl.run", "configs/cifar10.yaml", *TINY, f"pretrain.cache_dir={tmp_path / 'cache'}", f"data.path={data}",
         f"model.checkpoint={checkpoint}", f"trainer.fid_weights={tmp_path / 'nope.pth'}", "--run-dir",
         str(tmp_path / "run"), "--no-progress"],
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "trainer.fid_weights" in result.stderr and "sftrl weights inception" in result.stderr
    assert not (tmp_path / "run").exists()


def test_sample_writes_a_folder_of_pngs_and_a_grid(image_run, tmp_path):
    from PIL import Image

    run_dir, _ = image_run
    out = tmp_path / "pngs"
    result = run_cli(["sftrl.cli", "sample", str(run_dir), "-n", "10", "--batch-size", "4", "--format", "png",
                      "--out", str(out), "--device", "cpu", "--no-progress"], timeout=120)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:06d}.png" for i in range(10)]
    with Image.open(out / "000003.png") as image:
        assert image.mode == "RGB" and image.size == (32, 32)
    assert (tmp_path / "pngs-grid.png").is_file()
    npz = tmp_path / "x.npz"  # the same seed and batch size give the same samples in either format
    assert run_cli(["sftrl.cli", "sample", str(run_dir), "-n", "10", "--batch-size", "4", "--out", str(npz),
                    "--no-progress"], timeout=120).returncode == 0
    x = np.load(npz)["x"]
    assert x.shape == (10, 3, 32, 32) and x.dtype == np.float32
    with Image.open(out / "000007.png") as image:
        from sftrl.pictures import to_uint8

        np.testing.assert_array_equal(np.asarray(image), to_uint8(x[7]).transpose(1, 2, 0))
    again = run_cli(["sftrl.cli", "sample", str(run_dir), "-n", "2", "--format", "png", "--out", str(out)])
    assert again.returncode == 2 and "already exists" in again.stderr  # never merged into an old folder
    assert len(list(out.iterdir())) == 10


@pytest.mark.parametrize(("device", "needle"), [("cuda:7", "GPU(s) on this machine"), ("tpu", "is not a device")])
def test_sample_device_mistakes_are_one_line(image_run, tmp_path, device, needle):
    run_dir, _ = image_run
    result = run_cli(["sftrl.cli", "sample", str(run_dir), "-n", "2", "--device", device,
                      "--out", str(tmp_path / "x.npz")], timeout=60)
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_sample_holds_one_batch_of_float_samples_at_a_time(image_run, tmp_path, monkeypatch):
    """Before each new batch is drawn, the last one is on disk and no longer referenced: the
    process holds one batch of float samples whatever N (the 50,000-image figure is measured by
    benchmarks/sample_memory.py)."""
    import gc
    import weakref

    import sftrl.diffusion.step as step
    from sftrl.cli import main

    run_dir, _ = image_run
    real_batches, seen = step.sample_batches, []

    def watched(*args, **kwargs):
        for x in real_batches(*args, **kwargs):
            gc.collect()
            assert all(ref() is None for ref in seen), "an earlier batch of samples is still held"
            npy = list(tmp_path.glob(".x.npz.*.npy.tmp"))
            assert len(npy) == 1 and npy[0].stat().st_size > 3 * 32 * 32 * 4 * 3 * len(seen)  # on disk already
            seen.append(weakref.ref(x))
            yield x

    monkeypatch.setattr(step, "sample_batches", watched)
    assert main(["sample", str(run_dir), "-n", "11", "--batch-size", "3", "--device", "cpu",
                 "--out", str(tmp_path / "x.npz"), "--no-progress"]) == 0
    assert len(seen) == 4 and np.load(tmp_path / "x.npz")["x"].shape == (11, 3, 32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz", "x.png"]  # the grid; no temporary left


def test_eval_writes_the_grid_and_prints_the_fid(image_run):
    run_dir, _ = image_run
    result = run_cli(["sftrl.cli", "eval", str(run_dir)], timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["extractor"].startswith("inception-v3-compat") and "pictures" not in out
    assert list((run_dir / "samples").glob("samples-eval-iter-*.png"))


def test_weights_inception_fetches_checks_and_never_half_writes(tmp_path, inception_file, monkeypatch, capsys):
    import sftrl.metrics.weights_fetch as fetch
    from sftrl.cli import main
    from sftrl.metrics.inception import file_sha256

    cache = tmp_path / "weights"
    url = inception_file.as_uri()  # file:///...: what a user with a copy of the file passes
    # the random file is not the published one: the checksum says so, and nothing is written
    assert main(["weights", "inception", "--url", url, "--cache-dir", str(cache)]) == 2
    assert "not the published 6726825d" in capsys.readouterr().err
    assert list(cache.iterdir()) == []
    assert main(["weights", "inception", "--url", (tmp_path / "missing").as_uri(), "--cache-dir", str(cache)]) == 2
    assert "could not fetch the Inception weights" in capsys.readouterr().err and list(cache.iterdir()) == []
    # with its checksum taken as the published one, it is fetched once, loaded, and kept
    monkeypatch.setattr(fetch, "INCEPTION_SHA256_PREFIX", file_sha256(inception_file)[:8])
    monkeypatch.setattr(fetch.fetch_inception, "__kwdefaults__",
                        {**fetch.fetch_inception.__kwdefaults__, "sha256_prefix": file_sha256(inception_file)[:8]})
    assert main(["weights", "inception", "--url", url, "--cache-dir", str(cache)]) == 0
    assert [p.name for p in cache.iterdir()] == [INCEPTION_WEIGHTS_FILE]
    assert file_sha256(cache / INCEPTION_WEIGHTS_FILE) == file_sha256(inception_file)
    # a run with trainer.fid_weights null finds it in the cache beside pretrain.cache_dir
    from sftrl.config import load
    from sftrl.evaluation import choose_extractor

    cfg = load(REPO / "configs" / "cifar10.yaml", [f"pretrain.cache_dir={tmp_path / 'pretrained'}"])
    extractor, reason = choose_extractor(cfg, (3, 32, 32))
    assert extractor is not None and reason == ""
