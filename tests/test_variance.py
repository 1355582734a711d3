"""Learned step variances (``model.learn_variance``): the std's parameterisation, one kernel that
samples and scores with it (ratio exactly 1), training it, the config's checks, and a run that
learns, resumes, samples and exports with it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import REPO, assert_close, run_cli
from sftrl.algos import losses
from sftrl.buffer import ReplayBuffer
from sftrl.components import (
    InitState,
    fresh_sampler,
    make_critic_learner,
    make_learner,
    make_rollout_worker,
)
from sftrl.config import load, pretrain_key
from sftrl.configtools import ConfigError
from sftrl.diffusion.schedules import make_schedule
from sftrl.diffusion.step import denoise_step, gaussian_log_prob, rollout
from sftrl.diffusion.variance import (
    LOG_STD_KEY,
    attach_learned_variance,
    floored_std,
    initial_log_std,
    learned_log_std,
    step_entropy,
    step_stds,
)
from sftrl.models import attach_variance, build_networks
from sftrl.models.toy import ToySampler
from sftrl.perf import Autocast
from sftrl.plan import initial_stds, schedule_of
from sftrl.weights import Weights, to_numpy_state

torch.set_num_threads(1)
SMOKE = REPO / "configs" / "smoke.yaml"


def test_floored_std_starts_at_the_given_stds_and_never_reaches_the_floor():
    stds = torch.tensor([float("nan"), 0.001, 0.05, 0.3])
    log_std = initial_log_std(stds, floor=1e-4)
    assert log_std.shape == (4,)
    assert_close(floored_std(log_std, 1e-4)[1:], stds[1:], rtol=1e-6)
    assert_close(floored_std(log_std, 1e-4)[0], stds[1], rtol=1e-6)  # index 0 unused: step 1's
    far_below = floored_std(torch.tensor([-80.0, -20.0]), 1e-4)
    assert bool((far_below >= 1e-4).all()) and bool((far_below < 1.01e-4).all())
    per_channel = initial_log_std(stds, 1e-4, channels=3)
    assert per_channel.shape == (4, 3) and torch.equal(per_channel[:, 0], per_channel[:, 2])
    with pytest.raises(ValueError, match=r"n = \[1\].*not above the floor 0.01"):
        initial_log_std(stds, floor=0.01)


def test_log_prob_with_a_std_per_channel_is_the_exact_gaussian_density():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    std = torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.1  # (B, C)
    exact = torch.distributions.Normal(mean, std.view(4, 3, 1, 1)).log_prob(x).flatten(1)
    assert_close(gaussian_log_prob(x, mean, std, "sum"), exact.sum(1), rtol=1e-12, atol=1e-12)
    assert_close(gaussian_log_prob(x, mean, std, "mean"), exact.mean(1), rtol=1e-12, atol=1e-12)


def _learned_toy(S=5, T=20, channels=None):
    schedule = make_schedule("strided", S, num_train_steps=T, beta_schedule="linear")
    torch.manual_seed(0)
    model = ToySampler(T, hidden=32)
    sigma = schedule.tables("cpu", torch.float64).sigma.nan_to_num(0.0)
    stds = torch.where(sigma > 0, sigma, torch.full_like(sigma, 0.002))
    return attach_learned_variance(model, stds, 1e-4, channels), schedule


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_a_learned_std_samples_and_scores_with_one_kernel_ratio_exactly_one(reduction):
    model, schedule = _learned_toy()
    with torch.no_grad():  # away from the start, so the learned stds are not the schedule's
        model.step_log_std.add_(torch.linspace(-0.5, 0.5, schedule.num_steps + 1))
    tables, S, B = schedule.tables(), schedule.num_steps, 16
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        traj = rollout(model, tables, torch.randn(B, 2, generator=g), generator=g, reduction=reduction)
    learned = step_stds(model)
    assert_close(traj.stds, learned[traj.ns], rtol=0, atol=0)  # the learned stds, every step stochastic
    x_n, x_prev = traj.xs[:-1].reshape(S * B, 2), traj.xs[1:].reshape(S * B, 2)
    n = traj.ns.repeat_interleave(B)
    perm = torch.randperm(S * B, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = denoise_step(model, tables, x_n[perm], n[perm], x_prev=x_prev[perm], reduction=reduction)
        wrapped = denoise_step(Autocast(model, "cpu"), tables, x_n[perm], n[perm], x_prev=x_prev[perm], reduction=reduction)
    assert torch.equal(out.log_prob, traj.log_probs.reshape(S * B)[perm])
    assert learned_log_std(Autocast(model, "cpu")) is not None  # found through the runner's wrapper
    assert torch.equal(wrapped.std, out.std)


def test_a_std_per_channel_samples_each_channel_with_its_own_std():
    model, schedule = _learned_toy(channels=2)
    with torch.no_grad():
        model.step_log_std[:, 1] = math.log(3.0)  # channel 1: std ~3 at every step
    x_n = torch.zeros(20000, 2)
    n = torch.full((20000,), 2, dtype=torch.long)
    with torch.no_grad():
        out = denoise_step(model, schedule.tables(), x_n, n, generator=torch.Generator().manual_seed(0))
    assert out.std.shape == (20000, 2)
    spread = (out.x_prev - out.mean).std(0)
    assert spread[1].item() == pytest.approx(3.0, rel=0.03)
    assert spread[0].item() == pytest.approx(float(step_stds(model)[2, 0]), rel=0.03)


def test_the_policy_gradient_trains_the_std_with_eps_and_logs_it():
    cfg = load(SMOKE, ["model.learn_variance=true", "algo.policy_lr=1e-2"])
    sampler = fresh_sampler(cfg, (2,))
    assert not hasattr(sampler, LOG_STD_KEY)  # the pretrained network has none ...
    attach_variance(sampler, cfg, (2,))
    start = to_numpy_state(sampler)
    assert_close(step_stds(sampler)[1:], initial_stds(cfg, schedule_of(cfg))[1:], rtol=1e-5)  # ... and starts at sigma
    init = InitState(start, (2,))
    worker, learner = make_rollout_worker(cfg, init, 0), make_learner(cfg, init)
    critic = make_critic_learner(cfg, init, real_data=torch.randn(256, 2))
    buf = ReplayBuffer()
    worker.set_policy_weights(start, 0)
    worker.set_critic_weights(critic.get_weights().state["critic"], 0)
    buf.add_blocks(worker.rollout(2, 64))
    metrics = learner.update_policy(buf.sample(1, 64, seed=0), Weights(0, critic.get_weights().state))
    assert metrics[0]["ratio_min"] == metrics[0]["ratio_max"] == 1.0
    after = learner.get_weights().state[LOG_STD_KEY]
    assert not np.array_equal(after, start[LOG_STD_KEY])  # the std moved with eps_theta
    logged = [metrics[-1][f"learned_std/n{n}"] for n in range(1, cfg.diffusion.steps + 1)]
    assert_close(torch.tensor(logged), floored_std(torch.from_numpy(after), 1e-4)[1:], rtol=1e-6)


def test_model_variance_lr_gives_the_stds_their_own_learning_rate():
    cfg = load(SMOKE, ["model.learn_variance=true", "algo.policy_lr=1e-7", "model.variance_lr=1e-2",
                       "algo.max_grad_norm=null"])
    sampler = attach_variance(fresh_sampler(cfg, (2,)), cfg, (2,))
    start = to_numpy_state(sampler)
    init = InitState(start, (2,))
    worker, learner = make_rollout_worker(cfg, init, 0), make_learner(cfg, init)
    groups = learner.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-7, 1e-2] and len(groups[1]["params"]) == 1
    critic = make_critic_learner(cfg, init, real_data=torch.randn(256, 2))
    worker.set_policy_weights(start, 0)
    worker.set_critic_weights(critic.get_weights().state["critic"], 0)
    buf = ReplayBuffer()
    buf.add_blocks(worker.rollout(2, 64))
    learner.update_policy(buf.sample(1, 64, seed=0), Weights(0, critic.get_weights().state))
    after = learner.get_weights().state
    moved = {key: np.abs(after[key] - start[key]).max() for key in start}
    # Adam's first step moves each parameter by about its group's lr
    assert moved[LOG_STD_KEY] == pytest.approx(1e-2, rel=0.05)
    assert max(v for key, v in moved.items() if key != LOG_STD_KEY) < 2e-7
    with pytest.raises(ConfigError, match="'model.variance_lr' = 0.01 is invalid: is the learned stds' learning rate: "
                       "set model.learn_variance: true too"):
        load(SMOKE, ["model.variance_lr=1e-2"])


def test_the_step_entropy_is_the_gaussian_entropy_reduced_like_the_log_prob():
    model, _ = _learned_toy(channels=3)
    with torch.no_grad():
        model.step_log_std.copy_(torch.randn(model.step_log_std.shape, generator=torch.Generator().manual_seed(1)))
    n = torch.tensor([1, 3, 3, 5])
    shape = (3, 2, 2)  # a channel's std covers its 4 pixels
    std = step_stds(model)[n].double()  # (B, C)
    exact = torch.distributions.Normal(torch.zeros(4, 3, 2, 2, dtype=torch.float64),
                                       std.view(4, 3, 1, 1).expand(4, 3, 2, 2)).entropy().flatten(1)
    assert_close(step_entropy(model, n, shape, "sum"), exact.sum(1), rtol=1e-5)
    assert_close(step_entropy(model, n, shape, "mean"), exact.mean(1), rtol=1e-5)
    one, _ = _learned_toy()
    exact_one = torch.distributions.Normal(0.0, step_stds(one)[n].double()).entropy() * 2
    assert_close(step_entropy(one, n, (2,), "sum"), exact_one, rtol=1e-5)
    assert step_entropy(ToySampler(20, hidden=8), n, (2,), "sum") is None  # fixed stds: no parameter to move


def test_the_entropy_bonus_raises_the_learned_stds_and_is_off_at_zero():
    model, _ = _learned_toy()
    n = torch.tensor([1, 2, 5])
    bonus, metrics = losses.entropy_bonus(step_entropy(model, n, (2,), "sum"), coef=0.1)
    (grad,) = torch.autograd.grad(bonus, model.step_log_std)
    assert bool((grad[[1, 2, 5]] < 0).all()) and bool((grad[[3, 4]] == 0).all())  # a descent step raises them
    assert metrics["entropy"] == pytest.approx(float(step_entropy(model, n, (2,), "sum").detach().mean()))

    # Through the learner: the same update with the bonus ends with larger stds, and at 0 it is
    # sft-pg's update bit for bit (no entropy metric either).
    def updated(*overrides):
        cfg = load(SMOKE, ["model.learn_variance=true", "algo.policy_lr=1e-3", "model.variance_lr=1e-2", *overrides])
        start = to_numpy_state(attach_variance(fresh_sampler(cfg, (2,)), cfg, (2,)))
        init = InitState(start, (2,))
        worker, learner = make_rollout_worker(cfg, init, 0), make_learner(cfg, init)
        critic = make_critic_learner(cfg, init, real_data=torch.randn(256, 2, generator=torch.Generator().manual_seed(0)))
        worker.set_policy_weights(start, 0)
        worker.set_critic_weights(critic.get_weights().state["critic"], 0)
        buf = ReplayBuffer()
        buf.add_blocks(worker.rollout(2, 64))
        metrics = learner.update_policy(buf.sample(1, 64, seed=0), Weights(0, critic.get_weights().state))
        return learner.get_weights().state, metrics

    plain, plain_metrics = updated()
    zero, zero_metrics = updated("algo.entropy_coef=0")
    strong, strong_metrics = updated("algo.entropy_coef=100")
    assert all(np.array_equal(plain[k], zero[k]) for k in plain) and "entropy" not in zero_metrics[0]
    assert "entropy" in strong_metrics[0]
    raised = strong[LOG_STD_KEY][1:] - plain[LOG_STD_KEY][1:]  # steps absent from the minibatch stay
    assert bool((raised >= 0).all()) and int((raised > 0).sum()) >= 7
    with pytest.raises(ConfigError, match="'algo.entropy_coef' = 0.1 is invalid: is a bonus on the learned step stds: "
                       "set model.learn_variance: true too"):
        load(SMOKE, ["algo.entropy_coef=0.1"])
    with pytest.raises(ConfigError, match="'algo.entropy_coef' = 0.1 is invalid: .*algorithm 'sft'"):
        load(SMOKE, ["algo.entropy_coef=0.1", "algo.name=sft", "algo.critic_regulariser=GP", "model.learn_variance=true"])


def test_the_config_checks_the_floor_and_the_steps_it_starts_from():
    # The pretrained sampler is the same with and without learned variances: one cache entry.
    assert pretrain_key(load(SMOKE, ["model.learn_variance=true"])) == pretrain_key(load(SMOKE))
    with pytest.raises(ConfigError, match=r"'model.variance_floor' = 0.5 is invalid: step n = 1 starts at std"):
        load(SMOKE, ["model.learn_variance=true", "model.variance_floor=0.5"])
    ddim = ["diffusion.num_train_steps=1000", "diffusion.beta_schedule=linear", "diffusion.schedule=fastdpm-var-quadratic",
            "diffusion.kappa=1", "model.learn_variance=true"]
    with pytest.raises(ConfigError, match=r"'diffusion.final_step_std' = 0.0 is invalid with model.learn_variance: "
                       r"step n = \d+ has sigma = 0"):
        load(SMOKE, ddim)
    assert load(SMOKE, [*ddim, "diffusion.final_step_std=0.01"]).model.learn_variance
    with pytest.raises(ConfigError, match="'model.learn_variance_per_channel' = True is invalid: a std per channel "
                       "needs model.learn_variance: true and an image set"):
        load(SMOKE, ["model.learn_variance=true", "model.learn_variance_per_channel=true"])


def test_a_run_learns_its_stds_resumes_and_samples_with_them(tmp_path, cache_dir):
    run = tmp_path / "run"
    args = ["sftrl.run", str(SMOKE), "model.learn_variance=true", "ray.backend=local", "trainer.iterations=10",
            "trainer.checkpoint_every=5", f"pretrain.cache_dir={cache_dir}", "--run-dir", str(run), "--no-progress"]
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("policy/learned_std/n1" in line for line in lines)
    more = run_cli(["sftrl.run", "--run-dir", str(run), "--resume", "auto", "trainer.iterations=15", "--no-progress"])
    assert more.returncode == 0, more.stderr[-2000:]
    out = tmp_path / "s.npz"
    sampled = run_cli(["sftrl.cli", "sample", str(run), "-n", "50", "--out", str(out), "--no-progress"])
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    with np.load(out) as z:
        assert z["x"].shape == (50, 2) and np.isfinite(z["x"]).all()


def test_the_image_evaluator_samples_with_the_learned_stds(tmp_path, monkeypatch):
    """The image evaluator builds its own U-Net: it carries the learned stds, loads them with the
    learner's weights, and samples with them (a run on digits once failed here at its start)."""
    from sftrl.evaluation import build_image_evaluator
    from sftrl.metrics import fid

    monkeypatch.setattr(fid, "inception_extractor_if_available", lambda *a, **k: None)
    tiny = ["model.unet_ch=32", "model.unet_ch_mult=[1,2]", "model.unet_num_res_blocks=1", "model.unet_attn_resolutions=[]",
            "trainer.eval_samples=6", f"pretrain.cache_dir={tmp_path / 'cache'}", "device=cpu"]
    cfg = load(REPO / "configs" / "cifar10.yaml", [*tiny, "model.learn_variance=true", "diffusion.final_step_std=0.001"])
    shape = (3, 16, 16)
    sampler, _, _ = build_networks(cfg, shape)
    state = to_numpy_state(sampler)
    evaluator = build_image_evaluator(cfg, InitState(state, shape))  # no FID here: no data is read
    assert np.array_equal(evaluator.sampler.step_log_std.detach().numpy(), state[LOG_STD_KEY])
    first = evaluator.sample(state, 6, seed=0)
    wider = {**state, LOG_STD_KEY: state[LOG_STD_KEY] + 1.0}  # every std about e times larger
    second = evaluator.sample(wider, 6, seed=0)
    assert np.isfinite(first).all() and not np.array_equal(first, second)


def test_an_image_sampler_with_a_std_per_channel_exports_its_stds(tmp_path):
    from sftrl.export import export_diffusers

    cfg = load(REPO / "configs" / "digits.yaml", ["model.learn_variance=true", "model.learn_variance_per_channel=true"])
    sampler, _, _ = build_networks(cfg, (1, 8, 8))
    assert tuple(sampler.step_log_std.shape) == (cfg.diffusion.steps + 1, 1)
    with torch.no_grad():
        sampler.step_log_std[3] = math.log(0.25)
    out = export_diffusers(sampler, cfg, tmp_path / "export", run_dir=tmp_path, checkpoint=tmp_path / "c.pt")
    table = json.loads((out / "sftrl_schedule.json").read_text())
    assert table["learned_sigma"] is True
    by_n = {row["n"]: row["sigma"] for row in table["table"]}
    assert by_n[3] == pytest.approx(math.sqrt(1e-8 + 0.25**2), rel=1e-6)
    assert "were learned in fine-tuning" in (out / "README.md").read_text()
    from sftrl.models.diffusers_unet import load_diffusers_unet

    plain = load_diffusers_unet(out)  # the U-Net itself, without the stds
    assert not hasattr(plain, LOG_STD_KEY)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, sampler.state_dict()[key])
