"""Images end to end: the CIFAR-10 and CelebA configs through ``python -m sftrl.run``, from a
public-format DDPM/DDIM checkpoint, on tiny generated data sets in the real on-disk formats.

The configs' U-Nets are shrunk (ch 32, ch_mult [1, 2], one res block, no attention) and so are
the critic, the baseline and the batches; the schedules, the log-prob reduction and the final-step
std stay the configs' own. Nothing here needs a GPU, a download or the Inception weights (the
subprocesses get an empty TORCH_HOME, so FID is skipped and the report must say why).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli
from sftrl.checkpoint import latest_checkpoint, load_checkpoint
from sftrl.config import load
from sftrl.models.unet import UNet

TINY_UNET = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.1)
ITERATIONS, N_CRITIC, BATCH = 3, 2, 4
TINY = [
    "model.unet_ch=32",
    "model.unet_ch_mult=[1,2]",
    "model.unet_num_res_blocks=1",
    "model.unet_attn_resolutions=[]",
    "model.critic_channels=[8,16,32]",
    "model.baseline_hidden=[32,32]",
    f"algo.n_critic={N_CRITIC}",
    "algo.n_generator=2",
    f"algo.batch_size={BATCH}",
    f"trainer.iterations={ITERATIONS}",
    "trainer.eval_every=0",
    "trainer.eval_samples=8",
    "trainer.log_every=1",
    "trainer.checkpoint_every=0",
    "ray.backend=local",
    "rollout.num_gpus_per_worker=0",
    "ray.learner_num_gpus=0",
    "ray.critic_num_gpus=0",
    "device=cpu",
]


def tiny_unet(channels: int, resolution: int, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(out_ch=channels, in_channels=channels, resolution=resolution, **TINY_UNET)


def write_cifar_batches(root: Path, per_batch: int = 4, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/{data_batch_1..5, test_batch}``: pickled dicts, uint8 (n, 3072)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * per_batch}, f)
    return root


def write_celeba_jpegs(root: Path, n: int = 12, seed: int = 0) -> Path:
    """``root/img_align_celeba/000001.jpg ...``: 178x218 RGB JPEGs, as the aligned release."""
    from PIL import Image

    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:218, 0:178]
    for i in range(n):
        colour = rng.uniform(0, 255, 3)
        face = ((yy - 121) ** 2 + (xx - 89) ** 2 < rng.uniform(30, 60) ** 2)[..., None]  # a disc
        arr = np.where(face, colour, 255 - colour).astype(np.uint8)  # (218, 178, 3)
        Image.fromarray(arr).save(folder / f"{i + 1:06d}.jpg", format="JPEG", quality=95)
    return folder


def run_image_config(config: str, run_dir: Path, overrides: list[str], tmp: Path):
    env = {"TORCH_HOME": str(tmp / "torch-home")}  # no Inception weights: FID must be skipped
    return run_cli(
        ["sftrl.run", config, *TINY, f"pretrain.cache_dir={tmp / 'cache'}", *overrides, "--run-dir", str(run_dir), "--no-progress"],
        env=env,
        timeout=240,
    )


def assert_complete_image_run(run_dir: Path, checkpoint: Path, fmt: str) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    assert report["iterations"] == ITERATIONS and report["backend"] == "local"
    assert report["pretrain"]["source"] == "checkpoint"
    assert report["pretrain"]["format"] == fmt and report["pretrain"]["path"] == str(checkpoint)
    rows = report["evaluations"]
    assert [r["sampler"] for r in rows] == ["initial (pretrained)", "fine-tuned"]
    for row in rows:  # no Inception weights: no number is passed off as a FID, and it says why
        assert row["extractor"] == "none" and "fid" not in row
        assert "Inception extractor is not available" in row["fid_skipped"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "critic/ipm_gap" in line]
    assert [line["iteration"] for line in train] == list(range(1, ITERATIONS + 1))
    assert train[-1]["counters/chains"] == ITERATIONS * N_CRITIC * BATCH
    assert all(np.isfinite(line["policy/policy_loss"]) and np.isfinite(line["critic/ipm_gap"]) for line in train)
    assert train[0]["policy/ratio_min"] <= 1.0 <= train[0]["policy/ratio_max"]
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert state["iteration"] == ITERATIONS
    assert_pictures_at_each_evaluation(run_dir, [0, ITERATIONS])
    return state


def assert_pictures_at_each_evaluation(run_dir: Path, iterations: list[int]) -> None:
    """Each evaluation drew its sample grid (the same chains every time; FID or not) as a PNG
    in samples/ and a TensorBoard image, and curves.png exists."""
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator

    grids = sorted((run_dir / "samples").glob("samples-*.png"))
    assert [p.name for p in grids] == [f"samples-{i:06d}.png" for i in iterations]
    with Image.open(grids[0]) as image:
        assert image.mode in ("RGB", "L") and image.size[0] > 16
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"),
                                             size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    assert [e.step for e in acc.Images("eval/samples")] == iterations
    assert (run_dir / "curves.png").is_file()


def _moved(state: dict, initial: dict) -> bool:
    tuned = state["learner"]["policy"]
    assert set(tuned) == set(initial)
    return any(not torch.equal(tuned[k], initial[k]) for k in initial)


def test_cifar10_config_runs_from_a_plain_ddpm_state_dict(tmp_path):
    data = write_cifar_batches(tmp_path / "cifar")
    unet = tiny_unet(3, 32)
    checkpoint = tmp_path / "ddpm_cifar10_ema.pt"
    torch.save(unet.state_dict(), checkpoint)  # the CIFAR-10 EMA release: a plain state dict
    run_dir = tmp_path / "run"
    result = run_image_config(
        "configs/cifar10.yaml", run_dir, [f"data.path={data}", f"model.checkpoint={checkpoint}"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = assert_complete_image_run(run_dir, checkpoint, "ddim")
    assert state["config"]["diffusion"]["schedule"] == "fastdpm-var-quadratic"
    assert _moved(state, unet.state_dict())  # the policy steps changed theta
    assert "FID/KID skipped" in result.stderr


def test_a_best_following_kl_without_a_score_says_its_anchor_stays_and_the_run_completes(tmp_path):
    """reference: best on an image run whose FID is skipped (no Inception weights): one warning
    naming the key and the fix; the run still ends with its checkpoint, the anchor never moved."""
    data = write_cifar_batches(tmp_path / "cifar")
    checkpoint = tmp_path / "ddpm_cifar10_ema.pt"
    torch.save(tiny_unet(3, 32).state_dict(), checkpoint)
    run_dir = tmp_path / "run"
    result = run_image_config("configs/cifar10.yaml", run_dir, [
        f"data.path={data}", f"model.checkpoint={checkpoint}", "algo.name=sft-pg-kl",
        "algo.sft-pg-kl.reference=best", "trainer.eval_every=1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if "algo.sft-pg-kl.reference is 'best'" in line]
    assert len(said) == 1 and "anchored at the pretrained sampler" in said[0] and "sftrl weights inception" in said[0]
    assert "reference" not in load_checkpoint(latest_checkpoint(run_dir))["learner"]  # still theta_0
    assert "reference_moved" not in (run_dir / "metrics.jsonl").read_text()


def test_celeba_config_runs_from_the_ddim_training_list(tmp_path):
    folder = write_celeba_jpegs(tmp_path / "celeba")
    unet = tiny_unet(3, 16)
    ema = tiny_unet(3, 16, seed=1)  # the EMA weights differ from the raw model's
    optimizer = torch.optim.Adam(unet.parameters())
    unet(torch.zeros(1, 3, 16, 16), torch.zeros(1)).sum().backward()
    optimizer.step()
    prefixed = lambda sd: {f"module.{k}": v for k, v in sd.items()}  # noqa: E731 - DataParallel keys
    checkpoint = tmp_path / "ckpt.pth"
    torch.save([prefixed(unet.state_dict()), optimizer.state_dict(), 3, 1000, prefixed(ema.state_dict())], checkpoint)
    run_dir = tmp_path / "run"
    result = run_image_config(
        "configs/celeba.yaml",
        run_dir,
        [f"data.path={folder}", "data.image_size=16", f"model.checkpoint={checkpoint}"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = assert_complete_image_run(run_dir, checkpoint, "ddim")
    assert state["config"]["diffusion"]["schedule"] == "fastdpm-var-linear"
    assert state["config"]["algo"]["batch_size"] == BATCH
    # fine-tuning started from the EMA weights (one policy phase of 2 steps at lr 1e-6 with
    # gradients clipped to 0.1 moves each weight by at most ~2e-6 per step)
    tuned = state["learner"]["policy"]
    assert all(torch.allclose(tuned[k], v, atol=1e-4) for k, v in ema.state_dict().items())
    assert not all(torch.allclose(tuned[k], v, atol=1e-4) for k, v in unet.state_dict().items())


def test_mismatched_ddim_checkpoint_is_one_line_exit_2_and_writes_nothing(tmp_path):
    data = write_cifar_batches(tmp_path / "cifar")
    sd = tiny_unet(3, 32).state_dict()
    sd["conv_in.weight"] = torch.zeros(64, 3, 3, 3)  # a U-Net of another width
    checkpoint = tmp_path / "wrong.pt"
    torch.save(sd, checkpoint)
    run_dir = tmp_path / "run"
    result = run_image_config(
        "configs/cifar10.yaml", run_dir, [f"data.path={data}", f"model.checkpoint={checkpoint}"], tmp_path
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "1 mis-shaped key: conv_in.weight expected [32, 3, 3, 3] found [64, 3, 3, 3]" in lines[0]
    assert str(checkpoint) in lines[0] and "nothing was loaded" in lines[0]
    assert not run_dir.exists()


def test_unet_first_policy_step_rescores_with_ratio_exactly_one():
    """Rollouts score whole chains at one n per batch; the learner re-scores a random mix of
    transitions in other batches. With the U-Net in eval mode the two agree bit for bit."""
    from sftrl.buffer import ReplayBuffer
    from sftrl.components import InitState, make_critic_learner, make_learner, make_rollout_worker
    from sftrl.weights import to_numpy_state

    cfg = load(REPO / "configs" / "cifar10.yaml", [*TINY, "algo.batch_size=16", "data.path=unused"])
    assert cfg.diffusion.final_step_std == 0.001 and cfg.diffusion.log_prob_reduction == "mean"
    shape = (3, 16, 16)
    init = InitState(to_numpy_state(tiny_unet(3, 16)), shape)
    worker, learner = make_rollout_worker(cfg, init, 0), make_learner(cfg, init)
    real = np.random.default_rng(0).uniform(-1, 1, (32, *shape)).astype(np.float32)
    critic = make_critic_learner(cfg, init, real)
    *blocks, _ = worker.collect(learner.get_weights(), critic.get_weights(), ["b0", "b1"], 16)
    buffer = ReplayBuffer()
    for block in blocks:
        buffer.add(block, block.meta())
    critic.update(blocks)
    metrics = learner.update_policy(buffer.sample(2, 16, seed=0), critic.get_weights())
    assert metrics[0]["ratio_min"] == metrics[0]["ratio_max"] == metrics[0]["ratio_mean"] == 1.0
    # the second step sees the moved policy
    assert metrics[1]["ratio_min"] != 1.0 or metrics[1]["ratio_max"] != 1.0


@pytest.mark.parametrize("config", ["digits", "mnist", "cifar10", "celeba"])
def test_image_configs_load_and_validate(config):
    cfg = load(REPO / "configs" / f"{config}.yaml")
    assert cfg.model.sampler == "unet" and not cfg.is_toy
    assert cfg.algo.lam == 1.0 and cfg.diffusion.log_prob_reduction == "mean"


# ------------------------------------------------------------------ the image evaluator itself


class MeanPoolFeatures(torch.nn.Module):
    """A stand-in extractor: per-channel means and standard deviations of 2x2 pooled images."""

    name = "test-meanpool (not Inception)"
    num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(x.float(), 2)  # (B, 3, H/2, W/2)
        return torch.cat([pooled.mean((2, 3)), pooled.std((2, 3))], dim=1)  # (B, 6)


def test_image_evaluator_scores_its_own_fixed_seed_samples():
    from sftrl.diffusion.schedules import make_schedule
    from sftrl.evaluation import ImageEvalSettings, ImageEvaluator
    from sftrl.metrics.fid import fid_kid
    from sftrl.weights import to_numpy_state

    schedule = make_schedule("fastdpm-var-quadratic", 10, num_train_steps=1000, beta_schedule="linear")
    real = np.random.default_rng(0).uniform(-1, 1, (40, 3, 16, 16)).astype(np.float32)
    settings = ImageEvalSettings(num_samples=24, seed=7, batch_size=10)  # three sampling batches
    evaluator = ImageEvaluator(tiny_unet(3, 16), schedule, real, MeanPoolFeatures(), settings)
    first, again = evaluator.evaluate(None), evaluator.evaluate(None)
    grid, grid_again = first.pop("pictures")["samples"], again.pop("pictures")["samples"]
    assert first == again and np.array_equal(grid, grid_again)  # the same noise every evaluation
    fake = evaluator.sample(None, 24, seed=7)
    assert fake.shape == (24, 3, 16, 16) and fake.dtype == np.float32
    expected = fid_kid(real, fake, MeanPoolFeatures(), kid_subset_size=1000, batch_size=10, seed=7)
    assert first["fid"] == expected.fid and first["kid_mean"] == expected.kid_mean
    assert first["extractor"] == "test-meanpool (not Inception)"
    assert (first["num_real"], first["num_fake"]) == (40, 24)
    other = evaluator.evaluate(to_numpy_state(tiny_unet(3, 16, seed=3)))  # weights are loaded
    assert other["fid"] != first["fid"]


def grid_size_px_hwc(n: int, side: int) -> tuple[int, int, int]:
    from sftrl.pictures import grid_size_px

    width, height = grid_size_px(n, 8, side, side)
    return (height, width, 3)


def test_extractor_choice_never_passes_off_a_stand_in_fid(tmp_path, monkeypatch):
    import sftrl.metrics.fid as fid
    from sftrl.components import InitState
    from sftrl.evaluation import ImageEvaluator, build_evaluator, choose_extractor

    monkeypatch.setattr(fid, "inception_extractor_if_available", lambda *a, **k: None)
    calls = []
    monkeypatch.setattr(fid, "digits_extractor", lambda cache_dir, image_size: calls.append((cache_dir, image_size)) or MeanPoolFeatures())
    cache = tmp_path / "sub" / "pretrained"
    for name in ("mnist", "cifar10", "celeba"):
        cfg = load(REPO / "configs" / f"{name}.yaml", [f"pretrain.cache_dir={cache}"])
        extractor, reason = choose_extractor(cfg, (3, 32, 32))
        assert extractor is None and "Inception extractor is not available" in reason and repr(name) in reason
    cfg = load(REPO / "configs" / "cifar10.yaml", [*TINY, "trainer.eval_samples=4", f"pretrain.cache_dir={cache}"])
    evaluator = build_evaluator(cfg, InitState(None, (3, 32, 32)))  # no data set is read: nothing to compare with
    assert isinstance(evaluator, ImageEvaluator) and evaluator.extractor is None
    result = evaluator.evaluate(None)
    assert result.pop("pictures")["samples"].shape == grid_size_px_hwc(4, 32)  # the grid is still drawn
    assert result == {"extractor": "none", "fid_skipped": evaluator.skipped}
    digits = load(REPO / "configs" / "digits.yaml", [f"pretrain.cache_dir={cache}"])
    extractor, reason = choose_extractor(digits, (1, 8, 8))
    assert isinstance(extractor, MeanPoolFeatures) and reason == ""
    assert calls == [(tmp_path / "sub" / "extractors", 8)]  # beside the pretrained-sampler cache


# ------------------------------------------------------------- telling checkpoint formats apart


def test_initial_checkpoint_formats_are_told_apart(tmp_path):
    from sftrl.files import torch_save_atomic
    from sftrl.models import build_unet
    from sftrl.pretraining import (
        SamplerCheckpointError,
        load_initial_checkpoint,
        sampler_checkpoint,
    )

    cfg = load(REPO / "configs" / "cifar10.yaml", TINY)
    source = tiny_unet(3, 32, seed=5)
    ours, release = tmp_path / "sftrl.pt", tmp_path / "release.pt"
    torch_save_atomic(sampler_checkpoint(source, cfg, {"epoch_loss": [0.1], "seconds": 1.0}), ours)
    torch.save(source.state_dict(), release)
    for path, fmt in ((ours, "sftrl-sampler-v1"), (release, "ddim")):
        target = build_unet(cfg, (3, 32, 32))
        info = load_initial_checkpoint(path, target, cfg)
        assert info == {"source": "checkpoint", "format": fmt, "path": str(path), "seconds": 0.0}
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())

    wider = load(REPO / "configs" / "cifar10.yaml", [*TINY, "model.unet_ch=64"])
    with pytest.raises(SamplerCheckpointError, match=r"is for another model \(unet: checkpoint .*'ch': 32.* vs config .*'ch': 64"):
        load_initial_checkpoint(ours, build_unet(wider, (3, 32, 32)), wider)
    toy = load(REPO / "configs" / "smoke.yaml")
    from sftrl.models import build_networks

    with pytest.raises(SamplerCheckpointError, match="public DDPM/DDIM checkpoints need model.sampler: unet"):
        load_initial_checkpoint(release, build_networks(toy, (2,))[0], toy)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SamplerCheckpointError, match="not a readable PyTorch file"):
        load_initial_checkpoint(tmp_path / "junk.pt", build_unet(cfg, (3, 32, 32)), cfg)


def test_a_sampler_checkpoint_trained_on_other_betas_is_refused(tmp_path):
    from sftrl.files import torch_save_atomic
    from sftrl.models import build_networks
    from sftrl.pretraining import (
        SamplerCheckpointError,
        load_sampler_checkpoint,
        sampler_checkpoint,
    )

    sigmoid = load(REPO / "configs" / "smoke.yaml")
    path = tmp_path / "sampler.pt"
    torch_save_atomic(sampler_checkpoint(build_networks(sigmoid, (2,))[0], sigmoid, {"epoch_loss": [0.1]}), path)
    load_sampler_checkpoint(path, build_networks(sigmoid, (2,))[0], sigmoid)
    linear = load(REPO / "configs" / "smoke.yaml", ["diffusion.beta_schedule=linear"])
    with pytest.raises(SamplerCheckpointError, match="beta_schedule: checkpoint 'sigmoid' vs config 'linear'"):
        load_sampler_checkpoint(path, build_networks(linear, (2,))[0], linear)
